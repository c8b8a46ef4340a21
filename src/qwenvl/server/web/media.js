// Pictures and videos in the page: reading a file as the data: URI the API takes, and drawing
// a video's frames at the times the server says it sampled them.

export function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

export function kindOf(file) {
  if (file.type.startsWith('image/')) return 'image';
  if (file.type.startsWith('video/')) return 'video';
  return null;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function once(target, ok, bad = 'error') {
  return new Promise((resolve, reject) => {
    const done = () => {
      target.removeEventListener(ok, done);
      target.removeEventListener(bad, fail);
      resolve();
    };
    const fail = () => {
      target.removeEventListener(ok, done);
      target.removeEventListener(bad, fail);
      reject(new Error('the browser cannot decode this video'));
    };
    target.addEventListener(ok, done);
    target.addEventListener(bad, fail);
  });
}

const THUMB_HEIGHT = 56;

// One canvas per timestamp, showing the frame on screen at that time. A seek to a frame's own
// timestamp can land on the frame before it: half a source frame later is inside the frame.
export async function frameThumbs(url, timestamps, sourceFps) {
  const video = document.createElement('video');
  video.muted = true;
  video.preload = 'auto';
  video.src = url;
  await once(video, 'loadeddata');
  const nudge = sourceFps ? 0.5 / sourceFps : 0.001;
  const scale = THUMB_HEIGHT / video.videoHeight;
  const thumbs = [];
  for (const t of timestamps) {
    video.currentTime = Math.min(t + nudge, Math.max(video.duration - 1e-3, 0));
    await once(video, 'seeked');
    const canvas = document.createElement('canvas');
    canvas.width = Math.max(1, Math.round(video.videoWidth * scale));
    canvas.height = THUMB_HEIGHT;
    canvas.getContext('2d').drawImage(video, 0, 0, canvas.width, canvas.height);
    thumbs.push(canvas);
  }
  video.removeAttribute('src');
  video.load();
  return thumbs;
}
