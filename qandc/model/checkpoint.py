"""Loading and saving DiT weights.

Sources read by `load_checkpoint`:
- an original facebookresearch/DiT checkpoint: a plain state dict (as the released `DiT-XL-2-256x256.pt`) or a
  training checkpoint holding `ema` / `model` (and `opt`, `args`); the architecture is inferred from tensor shapes;
- a diffusers `DiTTransformer2DModel` directory (config.json + safetensors), mapped onto the same module: its
  per-block timestep/label embedders become one when they are copies (conversions of an original DiT), and stay per
  block (`DiTConfig.block_embedders`) when they differ (DiTs trained with diffusers);
- a diffusers DiT pipeline folder (model_index.json with transformer/, vae/, scheduler/, as
  `DiTPipeline.save_pretrained` writes): its transformer/ as above; its scheduler is only checked (qandc samples with
  its own DDPM / DDIM respacing of the 1000-step linear schedule, so a scheduler trained on another one is refused);
  its vae/ is found by `pipeline_vae`.
A sidecar `<name>.json` beside an original-format file, when present, supplies what shapes cannot tell (heads,
guidance mode, ...) under the key "model"; keyword overrides win over both.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path

import torch

from ..artifacts import ASSETS, atomic_path, read_json, read_safetensors, write_json
from ..errors import QandcError
from ..readers import SIDECAR_MAX_BYTES, refuse_zip_bomb, regular_file
from .dit import DIT_CONFIGS, DiT, DiTConfig, sincos_pos_embed

REFERENCE_CHECKPOINT = ASSETS / "reference-dit.pt"  # the Fashion-MNIST reference DiT shipped with qandc
HEADS_BY_HIDDEN = {cfg["hidden_size"]: cfg["num_heads"] for cfg in DIT_CONFIGS.values()}
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_INTS = ("num_attention_heads", "attention_head_dim", "num_layers", "sample_size", "patch_size",
                  "num_embeds_ada_norm")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON of an original-format checkpoint ({} when there is none)."""
    sidecar = sidecar_path(path)
    if not Path(path).is_file() or not sidecar.exists():  # a sidecar that is no regular file is refused, not skipped
        return {}
    data = read_json(sidecar, max_bytes=SIDECAR_MAX_BYTES)
    if not isinstance(data.get("model", {}), dict):
        raise QandcError(f"{sidecar}: not a valid sidecar JSON (its 'model' is not an object)")
    return data


def load_checkpoint(path: str | Path, **overrides) -> DiT:
    """Load a DiT in eval mode, float32, from an original checkpoint file or a diffusers directory."""
    path = Path(path)
    if not path.exists():
        raise QandcError(f"{path}: no such file or directory")
    if path.is_dir():
        config, state = _read_diffusers(_pipeline_transformer(path) if is_pipeline_folder(path) else path)
    else:
        config, state = _read_original(path)
    own_embedders = any(isinstance(k, str) and k.startswith("block_embedders.") for k in state)
    config = {"block_embedders": own_embedders, **config, **overrides}
    if "num_heads" not in config:
        raise QandcError(f"{path}: hidden size {config['hidden_size']} matches no named DiT config: "
                         "give the number of heads (num_heads= / --num-heads)")
    try:
        config = DiTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        with_sidecar = f" (with {sidecar_path(path)})" if read_sidecar(path).get("model") else ""
        raise QandcError(f"{path}{with_sidecar}: {e}") from None
    model = DiT(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misfit = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    if missing or unexpected or misfit:
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"unexpected {', '.join(map(str, unexpected[:3]))}" if unexpected else
                f"{misfit[0]} has shape {tuple(getattr(state[misfit[0]], 'shape', ()))}, the DiT "
                f"{tuple(expected[misfit[0]].shape)}")
        raise QandcError(f"{path}: weights do not fit the inferred DiT ({what})")
    model.load_state_dict(state)
    return model.float().eval()


def save_checkpoint(model: DiT, path: str | Path, record: dict | None = None) -> None:
    """Write the weights as an original-format plain state dict, and the sidecar JSON (config + `record`)."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_json(sidecar_path(path), {"model": model.config.to_dict(), **(record or {})})


def torch_load(path: Path) -> dict:
    """The dict a PyTorch file holds, unpickled with weights_only (a pickle that would import code is refused); a
    damaged file is a QandcError whatever torch's unpickler raises on it."""
    refuse_zip_bomb(regular_file(path), "PyTorch checkpoint")
    # Original training checkpoints carry their argparse namespace; allow that and nothing else beyond tensors.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickle protocols: the file is judged below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = [line for line in lines if "GLOBAL" in line]
        if code:  # a pickle that would import (and maybe run) something: never loaded
            raise QandcError(f"{path}: refused: it holds Python objects beyond weights ({code[0][:160]})") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise QandcError(f"{path}: not a readable PyTorch checkpoint ({detail[:160]})") from None
    except Exception as e:  # damaged bytes make torch's unpickler raise any type (KeyError, IndexError, struct.error)
        detail = str(e).splitlines()[0][:160] if str(e) else "the file ends early"
        raise QandcError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(obj, dict):
        raise QandcError(f"{path}: not a DiT checkpoint (holds a {type(obj).__name__}, expected a state dict)")
    return obj


def _read_original(path: Path) -> tuple[dict, dict]:
    obj = torch_load(path)
    state = obj.get("ema", obj.get("model", obj))
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise QandcError(f"{path}: not a DiT checkpoint (no x_embedder.proj.weight; keys: "
                         f"{', '.join(list(obj)[:4])})")
    config = _infer_config(state, path)
    config.update(read_sidecar(path).get("model", {}))
    return config, state


def _infer_config(state: dict, path: Path) -> dict:
    """Architecture from tensor shapes (heads from the DiT config with that hidden size)."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_tokens = state["pos_embed"].shape[1]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise QandcError(f"{path}: not a DiT checkpoint (cannot read its shapes: {type(e).__name__}: {e})") from None
    grid = int(round(num_tokens ** 0.5))
    config = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=depth, mlp_ratio=mlp_hidden / hidden, num_classes=num_classes,
                  learn_sigma=out_channels == 2 * in_channels)
    if hidden in HEADS_BY_HIDDEN:
        config["num_heads"] = HEADS_BY_HIDDEN[hidden]
    return config


PIPELINE_INDEX = "model_index.json"
# The schedule DiT checkpoints are trained with and qandc's sampling respaces (qandc.sampling.diffusion reads it
# here), in diffusers' scheduler config terms.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                     "beta_end": 0.02, "prediction_type": "epsilon", "trained_betas": None}


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (it holds model_index.json)."""
    return Path(path).is_dir() and (Path(path) / PIPELINE_INDEX).exists()


def pipeline_vae(path: str | Path) -> Path | None:
    """The vae/ folder of a diffusers pipeline folder; None for any other checkpoint or a pipeline without one."""
    vae = Path(path) / "vae"
    return vae if is_pipeline_folder(path) and vae.is_dir() else None


def _pipeline_transformer(path: Path) -> Path:
    """The transformer/ folder of a diffusers DiT pipeline folder, once its scheduler is checked to be trained on
    the schedule qandc samples with (the scheduler itself is not used)."""
    index = read_json(path / PIPELINE_INDEX)
    if "transformer" not in index or not (path / "transformer").is_dir():
        raise QandcError(f"{path}: a diffusers pipeline ({index.get('_class_name')!r}) without a transformer/ folder")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.exists():
        scheduler = read_json(scheduler_file)
        differs = [f"{k} {scheduler[k]!r} (qandc: {v!r})" for k, v in TRAINING_SCHEDULE.items()
                   if k in scheduler and scheduler[k] != v]
        if differs:
            raise QandcError(f"{scheduler_file}: qandc samples with the 1000-step linear DiT schedule; this "
                             f"scheduler's differs: {', '.join(differs)}")
    return path / "transformer"


def _read_diffusers(path: Path) -> tuple[dict, dict]:
    config_file = path / "config.json"
    if not config_file.exists():  # a config.json that is no regular file is refused by read_json
        raise QandcError(f"{path}: a directory, but not a diffusers model (no config.json)")
    cfg = read_json(config_file)
    if cfg.get("_class_name") not in DIFFUSERS_CLASSES or cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise QandcError(f"{config_file}: not a diffusers DiT (class {cfg.get('_class_name')!r}, "
                         f"norm {cfg.get('norm_type')!r})")
    wrong = [k for k in DIFFUSERS_INTS if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if wrong:
        raise QandcError(f"{config_file}: not a diffusers DiT config ({', '.join(wrong)}: missing or not an integer)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QandcError(f"{path}: no .safetensors weights")
    src = {}
    for file in files:
        src.update(read_safetensors(file))
    in_channels = cfg.get("in_channels", 4)
    out_channels = cfg.get("out_channels") or in_channels
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    config = dict(input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=in_channels,
                  hidden_size=hidden, depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"],
                  num_classes=cfg["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
                  freq_shift=1, mlp_norm_eps=cfg.get("norm_eps", 1e-5), guidance="all")
    try:
        state = _map_diffusers(src, cfg["num_layers"])
    except KeyError as e:
        raise QandcError(f"{path}: not a diffusers DiT (missing {e.args[0]})") from None
    config["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    grid = cfg["sample_size"] // cfg["patch_size"]
    state["pos_embed"] = torch.from_numpy(sincos_pos_embed(hidden, grid)).float().unsqueeze(0)
    if not config["learn_sigma"] and out_channels != in_channels:
        raise QandcError(f"{path}: {out_channels} output channels for {in_channels} input channels")
    return config, state


# Tensors stored alike in both layouts (original DiT prefix -> diffusers prefix; weight and bias each), and those
# of a timestep/label embedder, which diffusers keeps in every block under EMBEDDER.
_TOP_LAYERS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
               "final_layer.linear": "proj_out_2"}
_BLOCK_LAYERS = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                 "adaLN_modulation.1": "norm1.linear"}
_EMBEDDER_TENSORS = {"t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
                     "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
                     "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
                     "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
                     "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight"}
EMBEDDER = "transformer_blocks.{}.norm1.emb."


def _alike_keys(depth: int) -> list[tuple[str, str]]:
    """(original key, diffusers key) of every tensor stored the same way in both layouts: all but the fused qkv
    projection and the embedder."""
    layers = [*_TOP_LAYERS.items()]
    layers += [(f"blocks.{i}.{o}", f"transformer_blocks.{i}.{d}") for i in range(depth)
               for o, d in _BLOCK_LAYERS.items()]
    return [(f"{o}.{p}", f"{d}.{p}") for o, d in layers for p in ("weight", "bias")]


def _map_diffusers(src: dict, depth: int) -> dict:
    """diffusers DiT keys -> qandc DiT keys. diffusers gives every block its own timestep/label embedder: block 0's
    is the model's (diffusers' final layer uses it too); those of later blocks become `block_embedders` unless all
    are copies of block 0's (conversions of an original DiT), which the model then shares."""
    embedders = [{o: src[EMBEDDER.format(i) + d] for o, d in _EMBEDDER_TENSORS.items()} for i in range(depth)]
    state = {o: src[d] for o, d in _alike_keys(depth)}
    state.update(embedders[0])
    if any(not torch.equal(tensor, embedders[0][name]) for own in embedders[1:] for name, tensor in own.items()):
        state.update({f"block_embedders.{i}.{name}": tensor for i in range(1, depth)
                      for name, tensor in embedders[i].items()})
    for i in range(depth):
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([src[f"transformer_blocks.{i}.attn1.to_{n}.{p}"]
                                                          for n in "qkv"])
    return state


def to_diffusers(model: DiT):
    """The DiT as a diffusers `DiTTransformer2DModel` computing the same function (float32, eval, on the model's
    device): the inverse of the diffusers mapping, each block given its own embedder or the shared one, and the timestep
    embedding's frequency shift, which diffusers hard-codes to 1 (`downscale_freq_shift`), set to the model's.
    Guidance is no part of the module: drive it as the model's config says (`qandc.peers.DiffusersDenoiser`)."""
    from diffusers import DiTTransformer2DModel

    c = model.config
    if c.mlp_ratio != 4.0:
        raise QandcError(f"diffusers' DiT has MLP ratio 4; this DiT's is {c.mlp_ratio}")
    transformer = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=c.out_channels, num_layers=c.depth, sample_size=c.input_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_eps=c.mlp_norm_eps)
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = {d: src[o] for o, d in _alike_keys(c.depth)}
    for i in range(c.depth):
        own = f"block_embedders.{i}." if c.block_embedders and i else ""
        state.update({EMBEDDER.format(i) + d: src[own + o] for o, d in _EMBEDDER_TENSORS.items()})
        for p in ("weight", "bias"):
            for n, tensor in zip("qkv", src[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                state[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] = tensor
    transformer.load_state_dict(state, strict=True)
    with torch.no_grad():
        transformer.pos_embed.pos_embed.copy_(src["pos_embed"])
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = c.freq_shift
    return transformer.float().eval().to(model.device)
