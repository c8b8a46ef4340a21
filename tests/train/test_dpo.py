from __future__ import annotations

import json
import math

import torch
from test_packing import hf_summed_loss

from qwenvl.checkpoint import load_model
from qwenvl.processing.prompt import Processor
from qwenvl.train import LoraOptions, TrainConfig, Trainer
from qwenvl.train.dataset import load_dpo
from qwenvl.train.dpo import chosen_tokens, dpo_loss, pair_logprobs
from qwenvl.train.packing import collate, sample_losses


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -2.5])
    losses, margins = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: ((-3 + 3.5) - (-4 + 3.5)) = 1.0; pair 1: ((-5 + 4) - (-2 + 2.5)) = -1.5
    expected = [-math.log(1 / (1 + math.exp(-0.5))), -math.log(1 / (1 + math.exp(0.75)))]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-7, rtol=0)
    torch.testing.assert_close(margins, torch.tensor([0.5, -0.75]))


def test_pair_logprobs_are_per_reply_sums(checkpoints, hf_models, dpo_file):
    path = checkpoints("qwen2_vl")
    model, config = load_model(path, dtype="float32")
    processor = Processor.from_pretrained(path, config)
    pairs = load_dpo(dpo_file, processor)
    # the summed tokens are exactly each reply and its end-of-turn marker
    replies = [
        (r["chosen"], r["rejected"]) for r in map(json.loads, dpo_file.read_text().splitlines())
    ]
    for pair, texts in zip(pairs, replies):
        for sample, reply in zip(pair, texts):
            targets = [t for t, on in zip(sample.token_ids, sample.targets.tolist()) if on]
            assert processor.tokenizer.decode(targets) == reply + "<|im_end|>"
    batch = collate(pairs, 0)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch)
        alone = torch.cat([sample_losses(model, collate([[s]], 0)) for p in pairs for s in p])
    # the truth: minus transformers' summed loss of each reply (labels=), same checkpoint
    reference = torch.tensor(
        [[-hf_summed_loss(hf_models("qwen2_vl"), s) for s in p] for p in pairs]
    )
    torch.testing.assert_close(torch.stack([chosen, rejected], 1), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.stack([chosen, rejected], 1).flatten(), -alone, atol=1e-5, rtol=0
    )


def _margin(trainer):
    batch = collate(trainer.units, trainer.pad_id)
    with torch.no_grad():
        pc, pr = pair_logprobs(trainer.model, batch)
    return float((pc - pr).sum())


def test_dpo_steps_increase_the_margin(checkpoints, dpo_file, tmp_path):
    for i, lora in enumerate([None, LoraOptions(rank=4, alpha=16)]):
        trainer = Trainer(
            TrainConfig(
                model=str(checkpoints("qwen2_vl")),
                data=str(dpo_file),
                output=str(tmp_path / str(i)),
                method="dpo",
                lr=1e-3 if lora is None else 1e-2,
                epochs=4,
                batch_size=2,
                dpo_beta=0.5,
                progress=False,
                plot=False,
                lora=lora,
            )
        )
        before = _margin(trainer)
        result = trainer.run()
        after = _margin(trainer)
        print(
            f"dpo ({'lora' if lora else 'full'}) margin {before:.3f} -> {after:.3f}, loss "
            f"{result.metrics[0]['loss']:.4f} -> {result.metrics[-1]['loss']:.4f}"
        )
        assert after > before + 0.5
        assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
        assert abs(result.metrics[0]["loss"] - math.log(2)) < 1e-5  # policy == reference at start


def test_sft_term_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -2.5])
    n = torch.tensor([2, 4])
    losses, margins = dpo_loss(pc, pr, rc, rr, 0.5, sft_weight=0.2, chosen_tokens=n)
    # DPO as above, plus 0.2 x the chosen reply's mean token NLL: 3 / 2 tokens, 5 / 4 tokens
    expected = [
        -math.log(1 / (1 + math.exp(-0.5))) + 0.2 * 1.5,
        -math.log(1 / (1 + math.exp(0.75))) + 0.2 * 1.25,
    ]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-7, rtol=0)
    torch.testing.assert_close(margins, torch.tensor([0.5, -0.75]))  # the margin is DPO's own


def test_first_step_loss_is_log2_plus_weighted_nll(checkpoints, hf_models, dpo_file, tmp_path):
    """At step 1 the policy is the reference, so each pair's DPO term is log 2; the SFT term is
    the weight times transformers' mean token loss of the chosen reply (its labels= loss)."""
    path = checkpoints("qwen2_vl")
    trainer = Trainer(
        TrainConfig(
            model=str(path), data=str(dpo_file), output=str(tmp_path / "o"), method="dpo",
            batch_size=2, max_steps=1, dpo_sft_weight=0.7, progress=False, plot=False,
        )
    )  # fmt: skip
    tok = trainer.processor.tokenizer
    replies = [json.loads(x)["chosen"] for x in dpo_file.read_text().splitlines()]
    counts = [len(tok.encode(r)) + 1 for r in replies]  # the reply and its <|im_end|>
    assert chosen_tokens(collate(trainer.units, trainer.pad_id)).tolist() == counts
    hf = hf_models("qwen2_vl")
    nll = [hf_summed_loss(hf, pair[0]) / n for pair, n in zip(trainer.units, counts)]
    expected = math.log(2) + 0.7 * sum(nll) / len(nll)
    loss = trainer.run().metrics[0]["loss"]
    print(f"dpo+sft first loss {loss:.6f}, expected {expected:.6f}")
    assert abs(loss - expected) < 1e-5
