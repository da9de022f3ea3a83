"""Step-wise reward search as a k-diffusion-style sampler. Pure torch.

At every step inside a window, each current state draws K children from the same SDE transition
(one model call per step, see sde.py), a reward function scores all children at the next noise level in
one batched call, and the search keeps the best of them:

    greedy    keep the best child per batch item (the paper's step-wise search).
    beam      keep the best `beam_width` children per batch item out of beam_width * K.
    resample  Feynman-Kac style: the B batch rows are one particle population; B survivors are drawn
              from all B * K children with weights softmax(reward / temperature).

Layout: a population of P rows is stored "tiled" like ComfyUI repeats conditioning, row r descending
from batch item r % B (beam: row w * B + b is beam w of item b). Children of a step are stored
child-major, child k of row r at k * P + r.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from .sde import item_noise, sde_mean_std

MODES = ("greedy", "beam", "resample")

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""reward_fn(candidates [N, ...], sigma_next, parent_index LongTensor[N]) -> scores [N], higher is better."""


@torch.no_grad()
def sample_drm_stepwise(model: Callable[..., Tensor], x: Tensor, sigmas: Tensor,
                        extra_args: dict | None = None, callback: Callable[[dict], None] | None = None,
                        disable: bool | None = None, *, reward_fn: RewardFn, branches: int = 4,
                        eta: float = 0.7, mode: str = "greedy", beam_width: int = 2,
                        temperature: float = 1.0, window: tuple[int, int | None] = (0, None),
                        seed: int | None = None,
                        on_step: Callable[[int, Tensor, Tensor | None], None] | None = None,
                        interrupt: Callable[[], None] | None = None) -> Tensor:
    """Sample with step-wise reward search over SDE branches (flow-matching sigmas, 1 -> 0).

    model(x, sigma * s_in, **extra_args) returns denoised x0 for any batch size. Steps i with
    window[0] <= i < window[1] (None: through the last step) and sigmas[i + 1] > 0 branch into
    `branches` children per state, scored by ONE reward_fn(candidates, sigma_next, parent_index) call,
    where parent_index[n] is the row of the original x that candidate n descends from. Other steps take a
    plain SDE step. With branches == 1 and eta == 0 this is exactly the Euler sampler.

    mode: "greedy" (best child per item), "beam" (`beam_width` states per item; returns each item's beam
    with the highest last reward) or "resample" (the B rows are one particle population; survivors are
    drawn from all B * K children with weights softmax(reward / temperature), so rows may change item:
    use it when all rows share one prompt).

    Each batch item draws its candidates' noise from its own generator on x.device, seeded from
    `seed` (else extra_args["seed"], else 0) and the item's starting latent, which ComfyUI's
    prepare_noise draws from (seed, batch_index): an item gives the same result alone (say through
    LatentFromBatch) or in any batch, in greedy and beam mode. Resample mode mixes rows on purpose, so
    there an item's result depends on the batch. on_step(i, chosen_scores [B], candidate_scores) runs
    after each step: chosen_scores are the
    kept states' rewards (all NaN on steps that did not branch, as nothing was scored there);
    candidate_scores are None on those steps, else [B, K] (beam: [B, beam_width * K], column
    k * beam_width + w is child k of beam w; resample: row b holds the children of current row b).
    interrupt() is called before every model and reward_fn call, so it can raise to cancel.
    """
    extra_args = {} if extra_args is None else extra_args
    start, end = _check_args(sigmas, branches, eta, mode, beam_width, temperature, window)
    if seed is None:
        seed = extra_args.get("seed") or 0
    generators = item_generators(x, seed)
    resample_generator = torch.Generator(device=x.device).manual_seed(seed)
    interrupt = interrupt or (lambda: None)

    batch = x.shape[0]
    width = beam_width if mode == "beam" else 1
    states = x.repeat(width, *([1] * (x.ndim - 1)))
    origin = torch.arange(states.shape[0], device=x.device) % batch

    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        interrupt()
        denoised = model(states, sigma * states.new_ones([states.shape[0]]), **extra_args)
        if callback is not None:
            callback({"x": states[:batch], "i": i, "sigma": sigma, "sigma_hat": sigma,
                      "denoised": denoised[:batch]})
        mean, std = sde_mean_std(states, denoised, sigma, sigma_next, eta)

        if not (start <= i < end and sigma_next > 0):
            states = (mean + std * item_noise(generators, origin, 1, x.shape[1:])[0]).to(x.dtype)
            if on_step is not None:
                on_step(i, torch.full((batch,), float("nan"), device=x.device), None)
            continue

        # All children of all states go to one reward call: row k * P + r is child k of state r.
        children = (mean + std * item_noise(generators, origin, branches, x.shape[1:])).flatten(0, 1).to(x.dtype)
        child_origin = origin.repeat(branches)
        interrupt()
        scores = reward_fn(children, sigma_next, child_origin)
        if scores.shape != (children.shape[0],):
            raise ValueError(f"reward_fn must return one score per candidate, shape [{children.shape[0]}], "
                             f"got {tuple(scores.shape)}; reduce each candidate to a scalar.")
        scores = scores.to(device=x.device, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward_fn returned NaN or infinite scores at step {i} (sigma {float(sigma_next):.4f}); "
                             "keeping the best of them would pick at random. Run the reward model in bf16 or fp32.")

        if mode == "resample":
            keep = _resample(scores, batch, temperature, resample_generator)
            chosen, candidates = scores[keep], scores.view(branches, batch).T
            origin = child_origin[keep]
        else:
            keep, chosen, candidates = _top_per_item(scores, batch, width)
        states = children[keep]
        if on_step is not None:
            on_step(i, chosen, candidates)

    # Beams stay sorted by their last reward (topk sorts), so beam 0 is each item's best.
    return states[:batch]


def _check_args(sigmas: Tensor, branches: int, eta: float, mode: str, beam_width: int, temperature: float,
                window: tuple[int, int | None]) -> tuple[int, int]:
    """Raise a ValueError for the first bad argument; return the branching window as (start, end)."""
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError(f"sigmas must be a 1-D schedule, got shape {tuple(sigmas.shape)}; "
                         "pass the sampler's sigmas tensor, e.g. [1.0, ..., 0.0].")
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}; use 1 to disable branching.")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}; pass a non-negative SDE noise level "
                         "(0 makes every child identical).")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}; use 1 for greedy search.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; lower it towards 0 for sharper "
                         "selection.")
    steps = len(sigmas) - 1
    start, end = window
    end = steps if end is None else end
    if not 0 <= start <= end <= steps:
        shown = "-1" if window[1] is None else window[1]
        raise ValueError(f"window_start and window_end must satisfy 0 <= window_start <= window_end <= steps ({steps}); "
                         f"got {window[0]} and {shown}. window_end = -1 branches through the last step.")
    return start, end


def item_generators(x: Tensor, seed: int) -> list[torch.Generator]:
    """One generator per batch item of x [B, ...], on x's device, seeded from `seed` and the item's own
    values: the same item gets the same generator whatever batch it is in."""
    generators = []
    for item in x.detach().float().cpu():
        digest = hashlib.sha256(str(seed).encode() + item.numpy().tobytes()).digest()
        generators.append(torch.Generator(device=x.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return generators


def _top_per_item(scores: Tensor, batch: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the `width` best children per batch item (greedy is width 1).

    Child index c = (k * width + w) * batch + b is child k of beam w of item b, so viewing the scores
    as [K * width, batch] puts each item's candidates in one column. Returns the child rows to keep,
    laid out as the next population (w * batch + b, best beam first), the best score per item [B],
    and the candidate scores per item [B, K * width].
    """
    candidates = scores.view(-1, batch).T
    best = candidates.topk(width, dim=1)
    items = torch.arange(batch, device=scores.device)
    keep = (best.indices * batch + items[:, None]).T.flatten()
    return keep, best.values[:, 0], candidates


def _resample(scores: Tensor, survivors: int, temperature: float, generator: torch.Generator) -> Tensor:
    """Multinomial resampling: draw `survivors` child indices with weights softmax(scores / temperature)."""
    weights = torch.softmax(scores / temperature, dim=0)
    return torch.multinomial(weights, survivors, replacement=True, generator=generator)
