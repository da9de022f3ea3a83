"""`trainer grpo --grad-checkpointing`: the same policy-loss gradients, with each joint block recomputed in backward."""

from __future__ import annotations

import csv

import pytest
import torch

SIGMAS = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])


@pytest.fixture(scope="module")
def generator_sd(comfyui):
    from trainer.demo.tiny import tiny_generator_state_dict

    return tiny_generator_state_dict(depth=3)


def loss_gradients(generator_sd, checkpointing: bool) -> tuple[list[torch.Tensor], dict[str, int], dict]:
    """LoRA gradients of one Step-GRPO policy loss (CFG and the KL term on, two prompt lengths), the calls
    of joint block 0 during the rollout and during the loss, and the loss's diagnostics."""
    import comfy.sd

    from trainer.grpo.policy import Policy
    from trainer.grpo.rollout import Conditioning, policy_loss, rollout_step_grpo

    model = comfy.sd.load_diffusion_model_state_dict(dict(generator_sd), model_options={"dtype": torch.float32})
    policy = Policy(model, rank=4, alpha=8.0, include_mlp=True, device="cpu", seed=0, checkpointing=checkpointing)
    with torch.no_grad():  # a fresh LoRA's up weights are zero, which would leave the down weights no gradient
        gen = torch.Generator().manual_seed(3)
        for up in policy.lora.up:
            up.copy_(0.05 * torch.randn(up.shape, generator=gen))
    gen = torch.Generator().manual_seed(4)
    context = torch.randn(2, 8, 4096, generator=gen)
    context[1, 6:] = 0  # the second prompt has 6 tokens
    cond = Conditioning(context, torch.randn(2, 2048, generator=gen), torch.zeros(1, 8, 4096), torch.zeros(1, 2048),
                        torch.tensor([8, 6]))
    calls = {"block 0": 0}

    def count(*_):
        calls["block 0"] += 1

    model.model.diffusion_model.joint_blocks[0].register_forward_pre_hook(count)  # pre: a recomputation stops early

    def reward(x, sigma, rows):  # any deterministic score of the latents will do
        return x.flatten(1).std(dim=1)

    generators = [torch.Generator().manual_seed(s) for s in (10, 11)]
    records, _, _ = rollout_step_grpo(policy, reward, cond, generators, SIGMAS, (16, 8, 8), cfg=4.5, eta=0.7,
                                      branches=3, trained={0, 1, 2}, device="cpu")
    calls["rollout"], calls["block 0"] = calls["block 0"], 0
    stats = policy_loss(policy, records, cond, cfg=4.5, eta=0.7, clip_range=1e-4, kl_beta=0.1)
    calls["loss"] = calls.pop("block 0")
    calls["records"] = len(records)
    return [p.grad.clone() for p in policy.lora.parameters()], calls, stats


def test_checkpointed_gradients_equal_the_plain_ones(generator_sd):
    plain, plain_calls, plain_stats = loss_gradients(generator_sd, checkpointing=False)
    checkpointed, calls, stats = loss_gradients(generator_sd, checkpointing=True)
    assert all(g.abs().max() > 0 for g in plain)  # every down and up weight gets a gradient
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)
    assert stats == pytest.approx(plain_stats, rel=1e-6, abs=1e-12)
    # Block 0 runs once per model call, and a call runs once per prompt length (2 with CFG's positive
    # prompts, 1 with its negative one). Rollout, without gradient: 4 steps of 2 + 1 either way. Loss, per
    # record: the gradient forward (2), and the KL reference's CFG pair without gradient (2 + 1); with
    # checkpointing the gradient forward runs block 0 a second time in backward (2 more).
    assert calls["rollout"] == plain_calls["rollout"] == 4 * 3
    assert plain_calls["records"] == calls["records"] == 3
    assert plain_calls["loss"] == 3 * 5
    assert calls["loss"] == 3 * 7

def test_the_flag_is_in_the_help(comfyui, capsys):
    from trainer.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["grpo", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--grad-checkpointing" in text
    assert "recompute each joint block's activations in the backward pass" in text


@pytest.fixture(scope="module")
def files(generator_sd, tmp_path_factory):
    """The tiny generator, a random adapter DRM on its first block and a bank of 2 prompts."""
    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_conditioning
    from trainer.prompts import PromptBank

    root = tmp_path_factory.mktemp("grpo-checkpointing")
    atomic_save(generator_sd, root / "tiny-sd35.safetensors", {})
    atomic_save(tiny_adapter_drm_state_dict(generator_sd, blocks=1), root / "drm.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    conds = [tiny_conditioning(seed=i, tokens=8) for i in range(2)]
    PromptBank(["a", "b"], torch.cat([c[0][0] for c in conds]), torch.cat([c[0][1]["pooled_output"] for c in conds]),
               torch.zeros(1, 8, 4096), torch.zeros(1, 2048)).save(root / "prompts.safetensors")
    return root


def test_the_trainer_passes_the_flag_to_the_policy(files, tmp_path, monkeypatch):
    """`trainer grpo --grad-checkpointing` trains a checkpointed policy, to the same losses as without."""
    from safetensors.torch import load_file

    from trainer.__main__ import main
    from trainer.grpo.policy import Policy

    made = []
    init = Policy.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self.checkpointing)

    monkeypatch.setattr(Policy, "__init__", spy)
    runs = {}
    for flag in ((), ("--grad-checkpointing",)):
        out = tmp_path / ("checkpointed" if flag else "plain")
        assert main(["grpo", "--base", str(files / "tiny-sd35.safetensors"), "--drm", str(files / "drm.safetensors"),
                     "--prompts", str(files / "prompts.safetensors"), "--out", str(out), "--resolution", "64",
                     "--steps", "3", "--batch-size", "2", "--iterations", "2", "--eval-every", "100",
                     "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-3", *flag]) == 0
        with (out / "metrics.csv").open(newline="") as f:
            runs[out.name] = [float(r["loss"] or 0) for r in csv.DictReader(f)]
        runs[out.name + " lora"] = load_file(str(out / "tiny-sd35-step-grpo.safetensors"))
    assert made == [False, True]
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-5, abs=1e-12)
    a, b = runs["plain lora"], runs["checkpointed lora"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
