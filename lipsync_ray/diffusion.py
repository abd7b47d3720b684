"""The latent-diffusion step for one chunk: aligned face crops + per-frame audio -> generated face crops.

Upstream LatentSync per 16-frame window: the lower face (mask.png == 0) is masked out, the masked and the full
crops are VAE-encoded, and the U-Net denoises 4 noise channels conditioned on [mask, masked latents, reference
latents] (13 channels) and the audio, with classifier-free guidance against zero audio; the decoded face keeps
the reference's pixels where the mask is 1. The initial noise is one (4, h, w) draw shared by every frame, so it
depends on the seed only and any worker reproduces any chunk.

Ours: many windows per U-Net call (both guidance halves in the same batch), VAE latents taken at the posterior
mean (upstream samples, with a spread far below the decoder's resolution), and windows that overlap on the
global grid of `plan.windows` crossfaded in pixel space. The VAE runs on `VAE_FRAMES` frames at a time, upstream's
window size, so its activations never exceed upstream's whatever the U-Net batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .models.presets import VAE_SCALING, Components, make_scheduler
from .plan import WINDOW, Window, chunks, window_weights

if TYPE_CHECKING:
    from .models.unet import UNet3DConditionModel

VAE_FRAMES = 16


def load_mask(resolution: int) -> torch.Tensor:
    """The training mask at `resolution` (1 = keep, 0 = regenerate), LANCZOS-resized as upstream: (res, res)."""
    raw = resources.files("lipsync_ray").joinpath("data/mask.png").read_bytes()
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
    resized = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    return torch.from_numpy(resized.astype(np.float32) / 255.0)


@dataclass
class DiffusionParams:
    steps: int = 20
    guidance: float = 1.5
    seed: int = 1247
    scheduler: str = "ddim"
    windows_per_batch: int = 4
    deepcache: int = 0  # DeepCache interval (0 = off; upstream's --enable_deepcache uses 3)


@dataclass
class DeepCache:
    """DeepCache (Ma et al., CVPR 2024) at branch 0, as upstream's `DeepCacheSDHelper(cache_interval=3,
    cache_branch_id=0)`: every `interval`-th U-Net call runs in full and keeps the features at the branch point
    (`models.unet.deepcache_layer`); the calls in between reuse them and run only the layers around it. The U-Net's
    `forward` follows this schedule. One instance per denoising loop."""

    interval: int = 3
    calls: int = 0
    features: torch.Tensor | None = None

    def reuse(self) -> bool:
        reuse = self.features is not None and self.calls % self.interval != 0
        self.calls += 1
        return reuse


def compile_steps(unet: UNet3DConditionModel, **options) -> None:
    """torch.compile the U-Net's `deep` and `shallow` steps (options as torch.compile's); `forward` then runs them."""
    unet.deep = torch.compile(unet.deep, **options)  # type: ignore[method-assign]
    unet.shallow = torch.compile(unet.shallow, **options)  # type: ignore[method-assign]


def graph_steps(unet: UNet3DConditionModel) -> None:
    """Replay the U-Net's `deep` and `shallow` steps (compiled or not) as CUDA graphs, one per input shape (see
    `CUDAGraphed`), one replay of either in flight at a time and one memory pool for all their graphs."""
    done, pool = torch.cuda.Event(), torch.cuda.graph_pool_handle()
    unet.deep = CUDAGraphed(unet.deep, done, pool)  # type: ignore[method-assign]
    unet.shallow = CUDAGraphed(unet.shallow, done, pool)  # type: ignore[method-assign]


class CUDAGraphed:
    """`fn` captured as a CUDA graph on its first call with each input signature (shapes, dtypes, other arguments)
    and replayed after: a step's ~2,000 kernels then cost one launch, so the GPU no longer waits on the Python
    thread that launches them, which shares the GIL with the pipeline's other stages.

    The outputs are the graph's own buffers, overwritten by later replays (see the pool below). The denoising loop
    uses each step's output before the next step; DeepCache's features (the full step's) are reused by the
    shallow steps that follow, which replay another graph.

    A replay is launched only once the one before it (recorded in `done`, which graphs may share) has finished.
    Graph launches cost the host almost nothing, so the launching thread would otherwise queue a whole denoising
    loop, and queued graphs delay every other stream's work in the process (Compose's pasting on its own
    high-priority stream among it: docs/performance.md). While the thread waits, the GPU runs the step's eager kernels (guidance, scheduler) that it queued after the replay.

    Graphs sharing `pool` reuse each other's activation memory, as they never run at once. A capture never takes
    memory that an earlier graph's output holds (the outputs stay referenced here), so the full step's features
    survive the shallow replays; a replay may overwrite outputs of graphs captured after it, which the loop has
    used by then. The warm-up's cached blocks belong to its side stream, so they are released after capture."""

    def __init__(self, fn, done: torch.cuda.Event, pool: tuple):
        self.fn, self.done, self.pool = fn, done, pool
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, Any]] = {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype, a.stride(), a.device) if torch.is_tensor(a) else a for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, output = self.graphs[key]
        self.done.synchronize()
        for buffer, a in zip(inputs, args):
            if torch.is_tensor(a):
                buffer.copy_(a)
        graph.replay()
        self.done.record()
        return output

    def _capture(self, args: tuple) -> tuple[torch.cuda.CUDAGraph, list, Any]:
        inputs = [a.clone() if torch.is_tensor(a) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, kernel plans, Triton / Inductor compiles
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*inputs)
        torch.cuda.empty_cache()
        return graph, inputs, output


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The VAE's input in its activations' layout (`models.vae`)."""
    return x.contiguous(memory_format=torch.channels_last)


class LipSyncDiffusion:
    def __init__(
        self, components: Components, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        compile: bool = False, cuda_graphs: bool = False, pad_batches: bool | None = None,
    ):
        """`compile`: torch.compile the U-Net's steps (each new batch shape compiles once, then runs fused).
        `cuda_graphs` (on a GPU): replay the U-Net's steps as CUDA graphs (each new batch shape is captured once).
        `pad_batches` (default: when compiled or graphed) fills a short last batch up to `windows_per_batch` with
        copies of its last window, whose outputs are dropped: the U-Net then sees one batch shape, so it compiles
        and is captured once instead of once per leftover window count. Windows in a batch do not interact, so
        outputs are unchanged."""
        self.c = components
        self.device, self.dtype = torch.device(device), dtype
        cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if compile:
            compile_steps(components.unet, dynamic=False)
        if cuda_graphs:
            graph_steps(components.unet)
        self.pad_batches = (compile or cuda_graphs) if pad_batches is None else pad_batches
        # one `generate` at a time (Serve runs a replica's calls in threads): CUDA graphs replay into shared buffers
        self.lock = threading.Lock()
        self.resolution = components.preset.resolution
        self.mask = load_mask(self.resolution).to(self.device, dtype)
        lat = self.resolution // 8
        self.mask_latent = F.interpolate(self.mask[None, None], size=(lat, lat))  # nearest, as upstream

    def initial_noise(self, seed: int) -> torch.Tensor:
        lat = self.resolution // 8
        gen = torch.Generator("cpu").manual_seed(seed)
        return self._to_device(torch.randn(1, 4, 1, lat, lat, generator=gen)).to(self.dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for the GPU: a copy from pageable memory first waits for all
        the work queued on the stream (up to a whole U-Net step), and the launching thread stalls meanwhile. The
        scheduler's timesteps stay on the host for the same reason: it indexes host tables with them, and a GPU
        index would be copied back."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.c.vae.encode(_channels_last(part)).latent_dist.mode() for part in images.split(VAE_FRAMES)]
        ) * VAE_SCALING

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c.vae.decode(_channels_last(part / VAE_SCALING)).sample for part in latents.split(VAE_FRAMES)])

    @torch.no_grad()
    def generate(
        self, crops: np.ndarray, audio: torch.Tensor, windows: list[Window], params: DiffusionParams, overlap: int,
        offset: int = 0,
    ) -> np.ndarray:
        """crops (F, R, R, 3) uint8 and audio (F, tokens, dim) for frames [offset, offset + F), which the
        `windows` (global frame numbers) cover exactly -> generated crops (F, R, R, 3) uint8."""
        with self.lock:
            images = torch.from_numpy(np.asarray(crops)).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1
            audio = audio.to(self.device, self.dtype)
            out = torch.zeros_like(images)
            weight = torch.zeros(images.shape[0], device=self.device, dtype=self.dtype)
            weights = dict(zip(windows, window_weights(windows, overlap)))
            # batches group windows by their global index, so any chunking of the grid batches them alike
            groups: dict[int, list[Window]] = {}
            for w in windows:
                groups.setdefault(w.index // params.windows_per_batch, []).append(w)
            for batch in groups.values():
                idx = [self._to_device(self._frames(w, offset)) for w in batch]
                if self.pad_batches:
                    idx += idx[-1:] * (params.windows_per_batch - len(idx))
                decoded = self._denoise(images, audio, idx, params)  # zip below drops the padding's outputs
                for w, frames, dec in zip(batch, idx, decoded):
                    wt = weights[w]
                    n = w.stop - w.start
                    t = self._to_device(torch.as_tensor(wt, dtype=self.dtype))
                    out[frames[:n]] += dec[:n] * t[:, None, None, None]
                    weight[frames[:n]] += t
            out = out / weight[:, None, None, None]
            return ((out / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def warm_up(self, params: DiffusionParams, audio_shape: tuple[int, int]) -> None:
        """One U-Net batch of blank windows through `generate`: lazy GPU initialisation, kernel choices and (when
        compiled or graphed) the steps' compilation and capture for `params` happen now, while the stage is set up
        beside the others, instead of in its first chunk. `audio_shape`: (tokens, dim) of a frame's conditioning."""
        frames = WINDOW * params.windows_per_batch
        crops = np.zeros((frames, self.resolution, self.resolution, 3), np.uint8)
        batch = chunks(frames, params.windows_per_batch, overlap=0)[0].windows
        self.generate(crops, torch.zeros(frames, *audio_shape), list(batch), params, overlap=0)

    @staticmethod
    def _frames(w: Window, offset: int, length: int = 16) -> torch.Tensor:
        """Local frame indices of a window, padded to `length` by repeating its last frame."""
        idx = torch.arange(w.start, w.stop) - offset
        return torch.cat([idx, idx[-1:].expand(length - len(idx))])

    def _denoise(self, images: torch.Tensor, audio: torch.Tensor, idx: list[torch.Tensor], params: DiffusionParams):
        n, f = len(idx), len(idx[0])
        flat = torch.cat(idx)
        ref = images[flat]
        ref_lat = self._encode(ref)
        masked_lat = self._encode(ref * self.mask)

        def to_video(x):  # (n*f, c, h, w) -> (n, c, f, h, w)
            return x.reshape(n, f, *x.shape[1:]).transpose(1, 2)

        cond = torch.cat([self.mask_latent.expand(n, 1, f, *self.mask_latent.shape[-2:]), to_video(masked_lat), to_video(ref_lat)], 1)
        tokens = audio[flat]
        guided = params.guidance > 1
        if guided:
            cond = torch.cat([cond, cond])
            tokens = torch.cat([torch.zeros_like(tokens), tokens])
        scheduler = make_scheduler(params.scheduler)
        scheduler.set_timesteps(params.steps)  # on the host (see `_to_device`)
        latents = self.initial_noise(params.seed).expand(n, 4, f, -1, -1).clone() * scheduler.init_noise_sigma
        cache = DeepCache(params.deepcache) if params.deepcache > 1 else None
        for t, t_device in zip(scheduler.timesteps, self._to_device(scheduler.timesteps)):
            x = torch.cat([latents, latents]) if guided else latents
            x = torch.cat([scheduler.scale_model_input(x, t), cond], 1)
            eps = self.c.unet(x, t_device, encoder_hidden_states=tokens, cache=cache).sample
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + params.guidance * (text - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        faces = self._decode(latents.transpose(1, 2).reshape(n * f, 4, *latents.shape[-2:]))
        faces = faces * (1 - self.mask) + ref * self.mask  # keep the upper face from the reference
        return faces.reshape(n, f, *faces.shape[1:])
