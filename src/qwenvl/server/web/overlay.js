// Grounding drawn on the picture: the server's boxes, points and quads are in the original
// image's pixels, so an SVG with that viewBox laid over the <img> puts them in place at any
// display size.

const SVG = 'http://www.w3.org/2000/svg';

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const radius = (width) => Math.max(3, width / 80);

function anchorOf(obj, width) {
  if (obj.kind === 'box') return [obj.x1, obj.y1];
  if (obj.kind === 'point') return [obj.x - radius(width), obj.y - radius(width)];
  const xs = obj.points.map((p) => p[0]);
  const ys = obj.points.map((p) => p[1]);
  return [Math.min(...xs), Math.min(...ys)];
}

function shapeOf(obj, width) {
  const r = radius(width);
  if (obj.kind === 'box') {
    const w = Math.max(0, obj.x2 - obj.x1);
    const h = Math.max(0, obj.y2 - obj.y1);
    return el('rect', { class: 'shape', x: obj.x1, y: obj.y1, width: w, height: h });
  }
  if (obj.kind === 'point') return el('circle', { class: 'shape dot', cx: obj.x, cy: obj.y, r });
  const points = obj.points.map((p) => p.join(',')).join(' ');
  return el('polygon', { class: 'shape', points });
}

// A label sits above its shape's top-left corner, or inside it at the picture's top edge.
function labelOf(obj, index, width, height) {
  const text = obj.label || obj.text || `#${index + 1}`;
  const size = Math.max(9, Math.round(height / 22));
  const [x, y] = anchorOf(obj, width);
  const top = y - size - 2 >= 0 ? y - size - 2 : y;
  const g = el('g', { class: 'label' });
  const w = Math.min(width - x, text.length * size * 0.6 + 6);
  g.append(el('rect', { x, y: top, width: Math.max(w, 0), height: size + 2 }));
  g.append(el('text', { x: x + 3, y: top + size - 1, 'font-size': size }, text));
  return g;
}

export function groundingLayer(objects, width, height) {
  const svg = el('svg', {
    class: 'overlay',
    viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: 'none',
    role: 'img',
    'aria-label': `${objects.length} grounded object(s)`,
  });
  objects.forEach((obj, i) => {
    const g = el('g', { class: 'object' });
    g.append(el('title', {}, JSON.stringify(obj)));
    g.append(shapeOf(obj, width));
    g.append(labelOf(obj, i, width, height));
    svg.append(g);
  });
  return svg;
}
