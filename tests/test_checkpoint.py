import argparse
import json

import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.model import load_checkpoint, save_checkpoint


def _inputs(c, n=2):
    return (torch.randn(n, c.in_channels, c.input_size, c.input_size), torch.randint(0, 1000, (n,)),
            torch.randint(0, c.num_classes, (n,)))


def test_plain_state_dict_infers_the_architecture(tmp_path):
    # hidden 384 is DiT-S: the head count comes from that named config
    model = tiny_model(hidden_size=384, num_heads=6, patch_size=4, depth=2, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    loaded = load_checkpoint(tmp_path / "dit.pt")
    assert loaded.config == model.config
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    x, t, y = _inputs(model.config)
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_training_checkpoint_prefers_ema_and_allows_its_args(tmp_path):
    ema, raw = tiny_model(seed=1, hidden_size=384, num_heads=6), tiny_model(seed=2, hidden_size=384, num_heads=6)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, tmp_path / "0001000.pt")
    loaded = load_checkpoint(tmp_path / "0001000.pt")
    x, t, y = _inputs(ema.config)
    assert torch.equal(loaded(x, t, y), ema(x, t, y))


def test_unknown_hidden_size_needs_num_heads(tmp_path):
    model = tiny_model(hidden_size=48, num_heads=3)
    torch.save(model.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(QandcError, match="num_heads"):
        load_checkpoint(tmp_path / "odd.pt")
    assert load_checkpoint(tmp_path / "odd.pt", num_heads=3).config.num_heads == 3


def test_save_checkpoint_keeps_what_shapes_cannot_tell(tmp_path):
    model = tiny_model(guidance="all", freq_shift=1, num_heads=2)
    save_checkpoint(model, tmp_path / "m.pt", {"train": {"steps": 5}})
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["train"] == {"steps": 5}
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == model.config
    assert load_checkpoint(tmp_path / "m.pt", guidance="first3").config.guidance == "first3"


def _diffusers_dit(tmp_path, same_embedders=True):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(5)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                          out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in ref.parameters():  # diffusers zero-inits some layers: make every weight count
            p.copy_(torch.randn_like(p) * 0.2)
        if same_embedders:  # as in every conversion of an original DiT: one embedder, copied into each block
            for block in ref.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    ref.save_pretrained(tmp_path / "transformer")
    return ref, tmp_path / "transformer"


def test_diffusers_directory_matches_diffusers_forward(tmp_path):
    ref, path = _diffusers_dit(tmp_path)
    model = load_checkpoint(path)
    assert (model.config.freq_shift, model.config.guidance, model.config.depth) == (1, "all", 3)
    assert not model.config.block_embedders and not list(model.block_embedders)  # copies of one: shared
    x, t, y = _inputs(model.config, 3)
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
    assert rel_err(model(x, t, y), expected) <= 1e-5


def test_diffusers_guidance_guides_all_noise_channels(tmp_path):
    ref, path = _diffusers_dit(tmp_path)
    model = load_checkpoint(path)
    x, t, _ = _inputs(model.config, 2)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():  # DiTPipeline's guidance: all latent channels, the sigma channels passed through
        noise_pred = ref(x2, timestep=t2, class_labels=y2).sample
        eps, rest = noise_pred[:, :4], noise_pred[:, 4:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half = uncond + 4.0 * (cond - uncond)
        expected = torch.cat([torch.cat([half, half]), rest], dim=1)
    assert rel_err(model.forward_with_cfg(x2, t2, y2, 4.0), expected) <= 1e-5


def test_diffusers_initialised_dit_keeps_its_block_embedders(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(7)  # diffusers' own random init: every block's timestep/label embedder differs
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                          out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).eval()
    ref.save_pretrained(tmp_path / "transformer")
    model = load_checkpoint(tmp_path / "transformer")
    assert model.config.block_embedders and sorted(model.block_embedders) == ["1", "2"]
    x, t, y = _inputs(model.config, 3)
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        assert rel_err(model(x, t, y), expected) <= 1e-5
        model.block_embedders.clear()  # block 0's embedder for every block: no longer diffusers' function
        assert rel_err(model(x, t, y), expected) > 1e-3


def test_block_embedders_survive_saving_without_a_sidecar(tmp_path):
    model = tiny_model(block_embedders=True, hidden_size=384, num_heads=6)
    save_checkpoint(model, tmp_path / "m.pt")
    assert load_checkpoint(tmp_path / "m.pt").config == model.config
    (tmp_path / "m.json").unlink()  # the state dict alone tells the blocks have their own embedders
    loaded = load_checkpoint(tmp_path / "m.pt")
    x, t, y = _inputs(model.config)
    assert loaded.config.block_embedders and torch.equal(loaded(x, t, y), model(x, t, y))


def test_diffusers_folder_errors_name_the_folder(tmp_path):
    ref, path = _diffusers_dit(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "diffusion_pytorch_model.safetensors")
    del weights["transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"]
    save_file(weights, path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(QandcError, match="transformer: not a diffusers DiT") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


class _RunsCode:
    def __reduce__(self):
        import os
        return os.system, ("touch pwned-by-pickle",)


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(QandcError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned-by-pickle").exists()


@pytest.mark.parametrize("content,match", [
    (b"", "not a readable"), (b"\x00garbage" * 50, "not a readable"), (b"{\"a\": 1}", "not a readable"),
])
def test_non_checkpoints_give_one_line(tmp_path, content, match):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(QandcError, match=match) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(e.value) and "bad.pt" in str(e.value)


def test_truncated_and_foreign_checkpoints(tmp_path):
    model = tiny_model(hidden_size=384, num_heads=6)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    state = model.state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "partial.pt")
    for name, match in [("cut.pt", "not a readable"), ("other.pt", "not a DiT"), ("list.pt", "not a DiT"),
                        ("partial.pt", "missing blocks.1.mlp.fc2.bias"), ("absent.pt", "no such file")]:
        with pytest.raises(QandcError, match=match):
            load_checkpoint(tmp_path / name)


def test_bad_diffusers_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QandcError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(QandcError, match="not a diffusers DiT"):
        load_checkpoint(tmp_path / "unet")
