"""The ViT whose residual stream we store: open_clip by name (or a model-config JSON), its
preprocessing (a preset: open_clip's own transform, or HF CLIPImageProcessor's as CLIP-Scope used
it; see harvest/preprocess.py), hooks on the requested blocks, and a forward that stops after the
deepest one."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from activation_store.configs import check_choice, comma_list, option
from activation_store.devices import torch_device
from activation_store.errors import ConfigError, ModelError, PretrainedUnavailableError
from activation_store.harvest.preprocess import (CLIPSCOPE_MODEL, CLIPSCOPE_PRETRAINED, PRESET_CHOICES,
                                                 ClipScopeTransform, Normalizer, resolve_preset)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = CLIPSCOPE_MODEL
DEFAULT_PRETRAINED = CLIPSCOPE_PRETRAINED


@dataclass
class ModelConfig:
    """Which ViT, which weights, which preprocessing, which compute dtype."""

    model: str = option(DEFAULT_MODEL, help="open_clip model name, local-dir:PATH, hf-hub:ORG/REPO, or a model-config "
                        ".json")
    pretrained: str = option(DEFAULT_PRETRAINED, help="pretrained tag, a weights file, or none for random weights")
    seed: int = option(0, help="seed of random weights (--pretrained none)")
    mean: tuple[float, float, float] | None = option(None, parse=comma_list(float),
                                                     help="preprocessing mean R,G,B (needed with a weights file)")
    std: tuple[float, float, float] | None = option(None, parse=comma_list(float),
                                                    help="preprocessing std R,G,B (needed with a weights file)")
    preprocess_tag: str | None = option(None, help="with a weights file: use this pretrained tag's preprocessing")
    preprocess: str = option("auto", choices=PRESET_CHOICES,
                             help="preprocessing preset: open_clip (open_clip's eval transform), clipscope (HF "
                             "CLIPImageProcessor's, as CLIP-Scope trained on), auto (clipscope for ViT-L-14 / "
                             "laion2b_s32b_b82k, open_clip otherwise; a resumed store keeps its own)")
    compute_dtype: str = option("fp32", flag="--dtype", choices=tuple(COMPUTE_DTYPES), help="compute dtype of the ViT")
    device: str = option("cpu", help="cpu, cuda, cuda:1 ...")

    def __post_init__(self) -> None:
        check_choice("compute dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("preprocessing preset (--preprocess)", self.preprocess, PRESET_CHOICES)
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in v)
                if len(v) != 3:
                    raise ConfigError(f"--{name} takes 3 values (R,G,B), got {v}")
                setattr(self, name, v)


def _register_config_json(path: str) -> str:
    """Register an open_clip model-config JSON on the fly; returns the model name (the file stem)."""
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model config {path} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model config {path} is not valid JSON: {exc}") from exc
    if "vision_cfg" not in cfg:
        raise ModelError(f"model config {path} has no 'vision_cfg'; it must be an open_clip model config")
    open_clip.add_model_config(p)
    return p.stem


def _hf_cached(model: str, tag: str) -> bool:
    """Are the weights of an open_clip tag in the local Hugging Face cache (no network needed)?"""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo = (cfg or {}).get("hf_hub", "").strip("/")
    if not repo:
        return False
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return True
    return False


def pretrained_reachable(model: str, pretrained: str) -> bool:
    """Can these weights be loaded without downloading anything?"""
    if pretrained in ("none", "", None) or os.path.isfile(str(pretrained)):
        return True
    if str(model).startswith("local-dir:"):
        return True
    return _hf_cached(model, pretrained)


class LoadedViT:
    """An open_clip vision tower in eval mode with hooks on the requested blocks.

    `forward(pixels, sink)` runs the tower on normalised pixels and calls `sink(layer, tokens)`
    with each requested block's output (B, n_tokens, width), in block order; it stops right after
    the deepest requested block, so later blocks never run."""

    def __init__(self, cfg: ModelConfig, layers: list[int]) -> None:
        import open_clip

        self.cfg = cfg
        name = cfg.model
        if name.endswith(".json"):
            name = _register_config_json(name)
        self.model_name = name
        pretrained = None if cfg.pretrained in ("none", "", None) else cfg.pretrained
        self.random_weights = pretrained is None and not name.startswith(("local-dir:", "hf-hub:"))
        force_pre = None
        if pretrained is not None and os.path.isfile(pretrained):
            # open_clip silently applies OpenAI's mean/std to a bare weights file: insist on the real ones
            if cfg.preprocess_tag:
                tag_cfg = open_clip.get_pretrained_cfg(name, cfg.preprocess_tag)
                if not tag_cfg:
                    raise ModelError(f"{name} has no pretrained tag {cfg.preprocess_tag!r} to copy preprocessing from")
                force_pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            elif cfg.mean is None or cfg.std is None:
                raise ModelError(
                    f"weights file {pretrained} needs its preprocessing: pass --mean and --std (e.g. 0.5,0.5,0.5 "
                    f"for laion2b_s32b_b82k) or --preprocess-tag TAG; open_clip would otherwise use OpenAI's"
                )
        if cfg.mean is not None or cfg.std is not None:
            force_pre = dict(force_pre or {})
            if cfg.mean is not None:
                force_pre["mean"] = cfg.mean
            if cfg.std is not None:
                force_pre["std"] = cfg.std
        torch.manual_seed(cfg.seed)
        try:
            pre = force_pre or {}
            model, _, transform = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device="cpu", image_mean=pre.get("mean"), image_std=pre.get("std"),
                image_interpolation=pre.get("interpolation"), image_resize_mode=pre.get("resize_mode"),
            )
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "not found" in str(exc).lower():
                raise ModelError(f"open_clip does not know model {name!r} ({exc}); see open_clip.list_models()") from exc
            raise PretrainedUnavailableError(
                f"cannot load pretrained weights {cfg.pretrained!r} for {name}: {exc}. Use --pretrained none "
                f"(random weights), a weights file with --mean/--std, or a local-dir: model"
            ) from exc
        except Exception as exc:  # network errors from huggingface_hub, missing files, bad checkpoints
            raise PretrainedUnavailableError(
                f"cannot load pretrained weights {cfg.pretrained!r} for {name}: {type(exc).__name__}: {exc}. "
                f"Use --pretrained none (random weights), a weights file with --mean/--std, or a local-dir: model"
            ) from exc
        visual = model.visual
        del model  # the text tower is not needed
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise ModelError(f"{name} is not a ViT (its vision tower {type(visual).__name__} has no transformer blocks)")
        self.n_layers = len(blocks)
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ModelError(f"layers {bad} are out of range for {name}: it has blocks 0..{self.n_layers - 1}")
        self.layers = sorted(set(layers))
        self.width = int(visual.transformer.width)
        grid = visual.grid_size
        self.n_tokens = int(grid[0] * grid[1]) + (1 if getattr(visual, "class_embedding", None) is not None else 0)
        self.n_tokens += int(getattr(visual, "num_registers", 0) or 0)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

        pre = dict(getattr(visual, "preprocess_cfg", {}) or {})
        self.preset = resolve_preset(cfg.preprocess, cfg.model, cfg.pretrained, cfg.preprocess_tag)
        size = pre.get("size", visual.image_size)
        self.preprocess = {
            "image_size": list(size) if isinstance(size, (list, tuple)) else [int(size), int(size)],
            "mean": [float(x) for x in pre["mean"]],
            "std": [float(x) for x in pre["std"]],
            "interpolation": pre.get("interpolation", "bicubic"),
            "resize_mode": pre.get("resize_mode", "shortest"),
        }
        if self.preset == "clipscope":
            h, w = self.preprocess["image_size"]
            if h != w:
                raise ConfigError(f"--preprocess clipscope needs a square input, {name} takes {h}x{w}; use "
                                  f"--preprocess open_clip")
            # HF's CLIPImageProcessor: always bicubic, shortest side, centre crop (floored offsets)
            self.preprocess.update(interpolation="bicubic", resize_mode="shortest")
            self.transform = ClipScopeTransform(h, h)
        else:
            self.transform = transform
        self.fingerprint = self._fingerprint(visual)

        self.device = torch_device(cfg.device)
        self.dtype = COMPUTE_DTYPES[cfg.compute_dtype]
        self.visual = visual.to(self.device, self.dtype).eval().requires_grad_(False)
        self._sink = None
        self._deepest = self.layers[-1]
        for layer in self.layers:
            blocks[layer].register_forward_hook(self._make_hook(layer))
        self._normalize = Normalizer(self.preset, self.preprocess["mean"], self.preprocess["std"], self.device)

    def _fingerprint(self, visual) -> str:
        h = hashlib.sha256()
        what = {"model": self.model_name, "preprocess": self.preprocess}
        if self.preset != "open_clip":  # open_clip stores (made before presets existed) keep their fingerprint
            what["preset"] = self.preset
        h.update(json.dumps(what, sort_keys=True).encode())
        for key, t in sorted(visual.state_dict().items()):
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """What the store records about the model (root attribute `model`)."""
        return {
            "name": self.model_name,
            "pretrained": self.cfg.pretrained,
            "random_weights": self.random_weights,
            "seed": self.cfg.seed if self.random_weights else None,
            "image_size": self.preprocess["image_size"],
            "mean": self.preprocess["mean"],
            "std": self.preprocess["std"],
            "interpolation": self.preprocess["interpolation"],
            "resize_mode": self.preprocess["resize_mode"],
            "preprocess": self.preset,
            "n_layers": self.n_layers,
            "width": self.width,
            "n_tokens": self.n_tokens,
            "fingerprint": self.fingerprint,
        }

    def _make_hook(self, layer: int):
        def hook(_module, _inputs, output):
            tokens = output[0] if isinstance(output, tuple) else output
            if not self.batch_first:
                tokens = tokens.permute(1, 0, 2)
            if self._sink is not None:
                self._sink(layer, tokens)
            if layer == self._deepest:
                raise _StopForward

        return hook

    def normalize(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on the device -> normalised (B, 3, H, W) in the compute dtype: float32
        values equal to open_clip's ToTensor + Normalize (preset open_clip) or to HF's rescale +
        normalize (preset clipscope), then cast."""
        return self._normalize(pixels_uint8).to(self.dtype)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sink) -> None:
        self._sink = sink
        try:
            self.visual(pixels)
        except _StopForward:
            pass
        finally:
            self._sink = None

    @torch.inference_mode()
    def activations(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: (B, n_tokens, width)} for normalised pixels (a convenience; the harvest uses a sink)."""
        out: dict[int, torch.Tensor] = {}
        self.forward(pixels, lambda layer, t: out.__setitem__(layer, t.clone()))
        return out


class _StopForward(Exception):
    """Raised by the deepest hook: nothing after the deepest requested block needs to run."""


def preprocess_pil(transform, image) -> np.ndarray:
    """Apply the PIL stages of a preset's transform and return (H, W, 3) uint8: a ClipScopeTransform
    (RGB, resize, crop), or an open_clip eval transform (resize, crop, then RGB); ToTensor and
    Normalize happen on the device (`LoadedViT.normalize`)."""
    if isinstance(transform, ClipScopeTransform):
        return transform(image)
    for t in transform.transforms:
        if type(t).__name__ in ("ToTensor", "MaybeToTensor", "Normalize"):
            break
        image = t(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
