"""Know3D checkpoint format: save -> load round trips (delta and merged), metadata, every mismatch error."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _knowledge_helpers import KNOW_DIM, SS_RES, knowledge_tensor, randomize_branch, sparse_input, ss_inputs
from know3d_core.knowledge import (
    FORMAT_VERSION, Know3DFormatError, KnowledgeMismatchError, apply_know3d, detach_lora, dino_image_knowledge,
    init_lora,
    install_branch, load_know3d_merged, mmdit_hidden_knowledge, multi_view_knowledge, read_know3d, save_know3d,
    vae_latent_knowledge,
)
from know3d_core.trellis2.loading import load_model
from know3d_core.trellis2.loading import get_model_class
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args, write_checkpoint

SS = "sparse_structure_flow_model"
S512 = "shape_slat_flow_model_512"
STEMS = {SS: "ss_flow_img_dit_1_3B_64_bf16", S512: "slat_flow_img2shape_dit_1_3B_512_bf16",
         "shape_slat_flow_model_1024": "slat_flow_img2shape_dit_1_3B_1024_bf16"}
LAYERS = [1, 3, 5, 7]
SIGMA = 0.25


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Tiny flows in the official file layout (ckpts/NAME.json + all-bf16 NAME.safetensors), random
    weights; the structure grid is 8^3 instead of 16^3 to keep the CPU forwards short."""
    folder = str(tmp_path_factory.mktemp("trellis2"))
    for seed, (name, cls, kind, res) in enumerate([(SS, "SparseStructureFlowModel", "ss", SS_RES),
                                                   (S512, "SLatFlowModel", "shape512", None)]):
        args = tiny_flow_args(kind, resolution=res)
        model = get_model_class(cls)(**args)
        write_checkpoint(os.path.join(folder, "ckpts", STEMS[name]), cls, args,
                         random_state_dict(model, seed), torch.bfloat16)
    return folder


def _official(folder, name, dtype="float32"):
    return load_model(os.path.join(folder, "ckpts", STEMS[name]), dtype=dtype)


def _trained(folder, names=(SS, S512), rank=4, dtype="float32", kind="mmdit_hidden"):
    """Official models + a random branch + a random (non-zero) LoRA, unmerged: the training state."""
    models = {}
    for i, name in enumerate(names):
        m = _official(folder, name, dtype)
        if kind == "mmdit_hidden":
            install_branch(m, KNOW_DIM, kind=kind, mmdit_layers=LAYERS, sigma=SIGMA)
        else:
            install_branch(m, KNOW_DIM, kind=kind)
        randomize_branch(m, seed=10 + i)
        init_lora(m, rank=rank, alpha=2.0 * rank, generator=torch.Generator().manual_seed(i), b_std=0.3)
        models[name] = m
    return models


def _know(batch=1, seed=0):
    k = knowledge_tensor(batch=batch, seed=seed)
    return mmdit_hidden_knowledge(k, LAYERS, SIGMA, (64, 64), model="tiny-qwen")


def _outputs(models):
    out = {}
    with torch.no_grad():
        if SS in models:
            x, t, cond = ss_inputs(batch=2, seed=3)
            out[SS] = models[SS](x, t, cond, knowledge=_know())
        if S512 in models:
            x = sparse_input([19, 26], seed=4)
            out[S512] = models[S512](x, torch.full((2,), 300.0), torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5)),
                                     knowledge=_know()).feats
    return out


# ------------------------------------------------------------------ round trips
def test_delta_round_trip_unmerged_is_exact(official, tmp_path):
    src = _trained(official)
    path = tmp_path / "know3d.safetensors"
    spec = save_know3d(path, src, mmdit_model="tiny-qwen")
    assert spec.lora_rank == 4 and spec.lora_alpha == 8.0 and spec.mmdit_layers == LAYERS
    from know3d_core.mmdit.capture import CaptureSpec
    capture = CaptureSpec.from_metadata(spec.capture_metadata())
    assert capture.layers == tuple(LAYERS) and capture.sigma == SIGMA
    dst = {n: _official(official, n) for n in src}
    got = apply_know3d(dst, path, merge=False)
    assert got == spec
    for name in src:
        a, b = src[name].state_dict(), dst[name].state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ref, out = _outputs(src), _outputs(dst)
    for name in ref:
        assert torch.equal(ref[name], out[name])


def test_delta_round_trip_merged_matches_unmerged_fp32(official, tmp_path):
    src = _trained(official)
    path = tmp_path / "know3d.safetensors"
    save_know3d(path, src)
    dst = {n: _official(official, n) for n in src}
    apply_know3d(dst, path, merge=True)
    assert not any("lora_" in k for m in dst.values() for k in m.state_dict())
    ref, out = _outputs(src), _outputs(dst)
    for m in src.values():
        detach_lora(m)
    no_lora = _outputs(src)
    for name in ref:
        assert (ref[name] - out[name]).abs().max() <= 1e-5, name
        assert (ref[name] - no_lora[name]).abs().max() > 1e-3  # the LoRA matters


def test_merged_full_checkpoint_round_trip(official, tmp_path):
    src = _trained(official)
    path = tmp_path / "know3d_full.safetensors"
    spec = save_know3d(path, src, content="merged")
    assert spec.lora_merged
    loaded, spec2 = load_know3d_merged(path)
    assert spec2.lora_merged and spec2.knowledge_dim == KNOW_DIM
    ref, out = _outputs(src), _outputs(loaded)
    for name in ref:
        assert (ref[name] - out[name]).abs().max() <= 1e-5, name
    # re-saving the loaded merged models gives the same tensors
    path2 = tmp_path / "again.safetensors"
    save_know3d(path2, loaded, content="merged")
    a, b = load_file(str(path)), load_file(str(path2))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_models_round_trip_in_their_own_dtypes(official, tmp_path):
    src = _trained(official, names=(SS,), dtype="bfloat16")
    path = tmp_path / "k.safetensors"
    save_know3d(path, src)
    tensors = load_file(str(path))
    assert tensors[f"{SS}.blocks.0.knowledge_attn.to_q.weight"].dtype == torch.bfloat16
    assert tensors[f"{SS}.knowledge_proj.linear.weight"].dtype == torch.float32
    dst = {SS: _official(official, SS, "bfloat16")}
    apply_know3d(dst, path, merge=False)
    assert torch.equal(_outputs(src)[SS], _outputs(dst)[SS])


def test_file_layout_and_metadata(official, tmp_path):
    src = _trained(official, names=(SS,))
    path = tmp_path / "k.safetensors"
    save_know3d(path, src, mmdit_model="tiny-qwen")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["format"] == "know3d" and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["content"] == "delta" and json.loads(meta["models"]) == [SS]
    assert meta["knowledge_kind"] == "mmdit_hidden" and meta["knowledge_dim"] == str(KNOW_DIM)
    assert json.loads(meta["mmdit_layers"]) == LAYERS and json.loads(meta["sigma"]) == SIGMA
    assert meta["lora_rank"] == "4" and json.loads(meta["lora_alpha"]) == 8.0
    assert json.loads(meta["branch"])["num_heads"] == 4
    assert all(k.startswith(SS + ".") for k in keys)
    assert f"{SS}.blocks.1.self_attn.to_qkv.lora_A.weight" in keys
    assert f"{SS}.blocks.1.knowledge_attn.to_out.weight" in keys
    official_keys = set(_official(official, SS).state_dict())
    assert not any(k[len(SS) + 1:] in official_keys for k in keys)  # a delta holds no backbone weight


def test_subset_of_models_and_model_without_lora(official, tmp_path):
    src = _trained(official, rank=4)
    path = tmp_path / "k.safetensors"
    save_know3d(path, src)
    dst = {S512: _official(official, S512)}  # the 512 pipeline's shape model only
    apply_know3d(dst, path)
    # a branch-only file (no LoRA)
    m = _official(official, SS)
    install_branch(m, KNOW_DIM, kind="dino_image")
    randomize_branch(m)
    path2 = tmp_path / "nolora.safetensors"
    spec = save_know3d(path2, {SS: m})
    assert spec.lora_rank == 0 and spec.lora_alpha is None
    d2 = {SS: _official(official, SS)}
    apply_know3d(d2, path2)
    assert all(torch.equal(v, d2[SS].state_dict()[k]) for k, v in m.state_dict().items())


# ------------------------------------------------------------------ knowledge validation
def test_checkpoint_rejects_wrong_knowledge_naming_both(official, tmp_path):
    src = _trained(official, names=(SS,))
    path = tmp_path / "k.safetensors"
    save_know3d(path, src)
    ckpt = read_know3d(path)
    ckpt.check(_know())
    with pytest.raises(KnowledgeMismatchError, match=r"k.safetensors.*mmdit_hidden \(D=48.*got dino_image \(D=1024"):
        ckpt.check(dino_image_knowledge(torch.randn(1, 5, 1024), 512))
    with pytest.raises(KnowledgeMismatchError, match=r"vae_latent"):
        ckpt.check(vae_latent_knowledge(torch.randn(1, 16, 4, 4), (32, 32)))
    with pytest.raises(KnowledgeMismatchError, match=r"\[B, N, 48\], got \(1, 7, 96\)"):
        ckpt.check(torch.randn(1, 7, 96))
    with pytest.raises(KnowledgeMismatchError, match=r"layers \[1, 3, 5, 7\].*holds layers \[0, 2, 4, 6\]"):
        ckpt.check(mmdit_hidden_knowledge(knowledge_tensor(), [0, 2, 4, 6], SIGMA, (64, 64), "q"))
    with pytest.raises(KnowledgeMismatchError, match=r"sigma 0.25.*sigma 0.85"):
        ckpt.check(mmdit_hidden_knowledge(knowledge_tensor(), LAYERS, 0.85, (64, 64), "q"))
    with pytest.raises(KnowledgeMismatchError, match="multi_view knowledge is an extra image view"):
        ckpt.check(multi_view_knowledge(torch.rand(1, 32, 32, 3)))


def test_loaded_models_reject_wrong_knowledge_at_forward(official, tmp_path):
    src = _trained(official, names=(SS,))
    path = tmp_path / "k.safetensors"
    save_know3d(path, src)
    dst = {SS: _official(official, SS)}
    apply_know3d(dst, path)
    x, t, cond = ss_inputs()
    with torch.no_grad(), pytest.raises(KnowledgeMismatchError, match="trained for mmdit_hidden.*got dino_image"):
        dst[SS](x, t, cond, knowledge=dino_image_knowledge(torch.randn(1, 5, KNOW_DIM), 512))


# ------------------------------------------------------------------ file errors
def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _good_file(official, tmp_path):
    path = tmp_path / "good.safetensors"
    save_know3d(path, _trained(official, names=(SS,)))
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), dict(f.metadata())


def test_not_a_know3d_file(official, tmp_path):
    with pytest.raises(Know3DFormatError, match=r"ss_flow_img_dit_1_3B_64_bf16.safetensors is not a Know3D checkpoint"):
        read_know3d(os.path.join(official, "ckpts", STEMS[SS] + ".safetensors"))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_know3d(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"format_version": "2"}, "format_version 2"),
    ({"content": "weird"}, "content 'weird'"),
    ({"knowledge_kind": "multi_view"}, "multi_view needs no Know3D weights"),
    ({"knowledge_kind": "nonsense"}, "not an injected kind"),
    ({"mmdit_layers": "null"}, "must state mmdit_layers and sigma"),
    ({"mmdit_layers": "[1, 2, 3, 4, 5]"}, "not a multiple"),
    ({"knowledge_dim": "96"}, r"knowledge_proj.linear.weight is \(64, 48\).*knowledge_dim 96"),
    ({"lora_rank": "8"}, "rank \\[4\\], metadata lora_rank 8"),
    ({"lora_alpha": "null"}, "needs a lora_alpha"),
    ({"models": "[]"}, "lists no flow model"),
    ({"models": json.dumps([S512])}, "does not start with a listed model"),
    ({"sigma": "{"}, "unreadable metadata"),
])
def test_bad_metadata_errors(official, tmp_path, change, message):
    tensors, meta = _good_file(official, tmp_path)
    path = _write(tmp_path / "bad.safetensors", tensors, {**meta, **change})
    with pytest.raises(Know3DFormatError, match=message):
        read_know3d(path)


def test_missing_metadata_key(official, tmp_path):
    tensors, meta = _good_file(official, tmp_path)
    del meta["knowledge_dim"]
    with pytest.raises(Know3DFormatError, match="lacks 'knowledge_dim'"):
        read_know3d(_write(tmp_path / "bad.safetensors", tensors, meta))


def test_delta_with_backbone_weights_or_unpaired_lora(official, tmp_path):
    tensors, meta = _good_file(official, tmp_path)
    extra = {**tensors, f"{SS}.blocks.0.norm2.weight": torch.ones(64)}
    with pytest.raises(Know3DFormatError, match="holds only branch and LoRA tensors.*norm2"):
        read_know3d(_write(tmp_path / "b1.safetensors", extra, meta))
    unpaired = {k: v for k, v in tensors.items() if not k.endswith("blocks.0.mlp.mlp.0.lora_B.weight")}
    with pytest.raises(Exception, match="only one of lora_A / lora_B"):
        read_know3d(_write(tmp_path / "b2.safetensors", unpaired, meta))


def test_branch_that_does_not_fit_the_model(official, tmp_path):
    tensors, meta = _good_file(official, tmp_path)
    missing = {k: v for k, v in tensors.items() if "blocks.1.knowledge_attn.to_q.bias" not in k}
    dst = {SS: _official(official, SS)}
    with pytest.raises(Know3DFormatError, match=r"missing \['blocks.1.knowledge_attn.to_q.bias'\]"):
        apply_know3d(dst, _write(tmp_path / "b.safetensors", missing, meta))
    assert dst[SS].knowledge_proj is None  # a failed load leaves the model plain
    wrong = dict(tensors)
    key = f"{SS}.blocks.0.knowledge_attn.to_q.weight"
    wrong[key] = torch.zeros(32, 64, dtype=wrong[key].dtype)
    with pytest.raises(Know3DFormatError, match=r"wrong shapes blocks.0.knowledge_attn.to_q.weight: file \(32, 64\)"):
        apply_know3d(dst, _write(tmp_path / "c.safetensors", wrong, meta))
    extra = {**tensors, f"{SS}.blocks.7.knowledge_attn.to_q.bias": torch.zeros(64)}
    with pytest.raises(Know3DFormatError, match=r"unexpected \['blocks.7.knowledge_attn.to_q.bias'\]"):
        apply_know3d(dst, _write(tmp_path / "d.safetensors", extra, meta))


def test_wrong_model_and_wrong_content_errors(official, tmp_path):
    path = tmp_path / "k.safetensors"
    save_know3d(path, _trained(official, names=(SS,)))
    with pytest.raises(Know3DFormatError, match=r"has no weights for 'shape_slat_flow_model_512'"):
        apply_know3d({S512: _official(official, S512)}, path)
    with pytest.raises(Know3DFormatError, match="is a delta file"):
        load_know3d_merged(path)
    m = _official(official, SS)
    apply_know3d({SS: m}, path)
    with pytest.raises(Know3DFormatError, match="already carries a Know3D branch"):
        apply_know3d({SS: m}, path)
    full = tmp_path / "full.safetensors"
    save_know3d(full, _trained(official, names=(SS,)), content="merged")
    with pytest.raises(Know3DFormatError, match="merged full checkpoint"):
        apply_know3d({SS: _official(official, SS)}, full)


def test_merged_file_without_config_or_with_lora(official, tmp_path):
    path = tmp_path / "full.safetensors"
    save_know3d(path, _trained(official, names=(SS,)), content="merged")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    with pytest.raises(Know3DFormatError, match="merged file without a config"):
        read_know3d(_write(tmp_path / "a.safetensors", tensors, {**meta, "configs": "{}"}))
    lora = {**tensors, f"{SS}.blocks.0.mlp.mlp.0.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(Know3DFormatError, match="must not hold LoRA factors"):
        read_know3d(_write(tmp_path / "b.safetensors", lora, meta))
    short = {k: v for k, v in tensors.items() if k != f"{SS}.blocks.0.norm2.bias"}
    with pytest.raises(Know3DFormatError, match=r"missing \['blocks.0.norm2.bias'\]"):
        load_know3d_merged(_write(tmp_path / "c.safetensors", short, meta))


def test_save_errors(official, tmp_path):
    plain = _official(official, SS)
    with pytest.raises(Know3DFormatError, match="has no Know3D branch to save"):
        save_know3d(tmp_path / "x.safetensors", {SS: plain})
    models = _trained(official)
    install_kind = _official(official, S512)
    install_branch(install_kind, KNOW_DIM, kind="dino_image")
    with pytest.raises(Know3DFormatError, match="differs from the others"):
        save_know3d(tmp_path / "x.safetensors", {SS: models[SS], S512: install_kind})
    with pytest.raises(ValueError, match="cannot be key prefixes"):
        save_know3d(tmp_path / "x.safetensors", {"a.b": models[SS]})
    nokind = _official(official, SS)
    install_branch(nokind, KNOW_DIM)
    with pytest.raises(Know3DFormatError, match="states no knowledge kind"):
        save_know3d(tmp_path / "x.safetensors", {SS: nokind})
    with pytest.raises(ValueError, match="content must be"):
        save_know3d(tmp_path / "x.safetensors", models, content="full")


def test_a_failed_apply_changes_no_model(official, tmp_path):
    path = tmp_path / "k.safetensors"
    save_know3d(path, _trained(official))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    key = f"{S512}.blocks.1.mlp.mlp.2.lora_A.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    bad = _write(tmp_path / "bad.safetensors", tensors, meta)
    dst = {n: _official(official, n) for n in (SS, S512)}
    with pytest.raises(Exception, match=r"blocks.1.mlp.mlp.2.*A \(4, "):
        apply_know3d(dst, bad)
    for name, model in dst.items():
        assert model.knowledge_proj is None
        ref = _official(official, name).state_dict()
        assert set(ref) == set(model.state_dict())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())
