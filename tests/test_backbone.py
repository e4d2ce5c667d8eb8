"""Backbone loading in every format users hold, checked against reference implementations."""
import json
import time

import pytest
import torch

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import build_backbone, load_strict, model_facts

import processes
from conftest import MODEL, SIZE, assert_clean_error, hf_reference_model, make_folder, run_cli


def test_cls_is_the_normed_cls_token_not_timms_default_patch_mean(backbone):
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        feats = backbone(pixels)
        tokens = backbone.model.forward_features(pixels)
        timm_default = backbone.model.forward_head(tokens, pre_logits=True)  # timm pools DINOv3 by patch mean
    assert torch.allclose(feats["cls"], tokens[:, 0])
    assert torch.allclose(feats["patch_mean"], timm_default, atol=1e-6)  # registers excluded, like timm's avg
    assert not torch.allclose(feats["cls"], timm_default, atol=1e-3)


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone):
    backbone.train()  # the original script's bug: custom_model.train() flipped the backbone to train mode
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_random_weights_are_the_same_on_every_build(backbone):
    again = build_backbone(MODEL, "random", SIZE, log=lambda *_: None)
    assert again.weights.sha256 == backbone.weights.sha256
    torch.testing.assert_close(again.model.state_dict(), backbone.model.state_dict())


def test_hugging_face_folder_matches_transformers_pooler_output(tmp_path):
    hf = hf_reference_model()
    hf.save_pretrained(tmp_path / "dinov3-vits16-pretrain-lvd1689m")
    ours = build_backbone(MODEL, str(tmp_path / "dinov3-vits16-pretrain-lvd1689m"), 48, log=lambda *_: None)
    assert ours.weights.source == "hf"
    pixels = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        expected = hf(pixel_values=pixels).pooler_output
        got = ours(pixels)["cls"]
    assert (got - expected).abs().max().item() <= 1e-4


def test_hugging_face_folder_of_another_size_is_refused(tmp_path):
    hf = hf_reference_model(register_tokens=0)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(DinoprobeError, match="num_register_tokens"):
        build_backbone(MODEL, str(tmp_path / "hf"), SIZE, log=lambda *_: None)


def _to_meta_names(state, periods):
    """timm names -> Meta's released DINOv3 checkpoint names (storage_tokens, ls1.gamma, fused qkv bias)."""
    meta = {}
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[key] = value.clone()
        if key.endswith("attn.qkv.weight"):
            meta[key.replace("weight", "bias")] = torch.zeros(value.shape[0])
            meta[key.replace("qkv.weight", "qkv.bias_mask")] = torch.ones(value.shape[0])
    meta["mask_token"] = torch.zeros(1, 384)
    meta["rope_embed.periods"] = periods.clone()
    return meta


def test_meta_pth_gives_the_same_features_as_timm_native_weights(tmp_path, backbone):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    torch.save(_to_meta_names(state, backbone.model.rope.periods), tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    save_file(state, tmp_path / "timm.safetensors")
    meta = build_backbone(MODEL, str(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"), SIZE)
    native = build_backbone(MODEL, str(tmp_path / "timm.safetensors"), SIZE)
    assert (meta.weights.source, native.weights.source) == ("meta", "timm")
    pixels = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        a, b, ref = meta(pixels), native(pixels), backbone(pixels)
    for kind in ("cls", "patch_mean"):
        assert (a[kind] - ref[kind]).abs().max() == 0
        assert (b[kind] - ref[kind]).abs().max() == 0


def test_meta_checkpoint_tensors_either_land_or_are_checked_inert(tmp_path, backbone):
    """Every Meta tensor lands in the model or is on INERT_ENTRIES and checked: a masked-out bias loads as zero,
    the k part of qkv.bias is ignored (softmax cancels it), and what the model cannot hold is refused by name."""
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    path = tmp_path / "meta.pth"

    def load(meta):
        torch.save(meta, path)
        return build_backbone(MODEL, str(path), SIZE, log=lambda *_: None)

    meta = _to_meta_names(state, backbone.model.rope.periods)
    dim = 384
    meta["blocks.0.attn.qkv.bias"][dim:2 * dim] = 5.0  # a k bias: inert
    meta["blocks.1.attn.qkv.bias"][:dim] = 3.0  # a q bias the mask switches off: inert
    meta["blocks.1.attn.qkv.bias_mask"][:dim] = 0.0
    meta["mask_token"] = torch.randn(1, 384)  # pretraining only
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert (load(meta)(pixels)["cls"] - backbone(pixels)["cls"]).abs().max() < 1e-5
    bad_bias = _to_meta_names(state, backbone.model.rope.periods)
    bad_bias["blocks.2.attn.qkv.bias"][2 * dim:] = 0.5  # a real v bias: this model has no place for it
    with pytest.raises(DinoprobeError, match="blocks.2.attn.qkv.bias.*vit_small_patch16_dinov3_qkvb"):
        load(bad_bias)
    bad_rope = _to_meta_names(state, backbone.model.rope.periods * 2)
    with pytest.raises(DinoprobeError, match="rope_embed.periods differs"):
        load(bad_rope)
    extra = _to_meta_names(state, backbone.model.rope.periods)
    extra["head.weight"] = torch.zeros(10, 384)
    with pytest.raises(DinoprobeError, match="unexpected keys: head.weight"):
        load(extra)


def test_timm_file_and_hub_copy_follow_the_same_rule(tmp_path, backbone, monkeypatch):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    save_file({**state, "rope.periods": backbone.model.rope.periods * 3}, tmp_path / "rope.safetensors")
    with pytest.raises(DinoprobeError, match="rope.periods differs"):
        build_backbone(MODEL, str(tmp_path / "rope.safetensors"), SIZE, log=lambda *_: None)
    save_file({**state, "fc_norm.weight": torch.ones(384)}, tmp_path / "extra.safetensors")
    with pytest.raises(DinoprobeError, match="unexpected keys: fc_norm.weight"):
        build_backbone(MODEL, str(tmp_path / "extra.safetensors"), SIZE, log=lambda *_: None)
    # a hub download takes the same path as a local timm file
    from dinoprobe.extract import backbone as bb

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: str(tmp_path / "extra.safetensors"))
    with pytest.raises(DinoprobeError, match="unexpected keys: fc_norm.weight"):
        bb.build_backbone(MODEL, "hub", SIZE, log=lambda *_: None)


def test_hugging_face_tensors_the_model_cannot_hold_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_reference_model()
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**weights, "model.layer.0.attention.extra.weight": torch.zeros(3)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(DinoprobeError, match="unexpected keys"):
        build_backbone(MODEL, str(tmp_path / "hf"), SIZE, log=lambda *_: None)
    weights[next(k for k in weights if k.endswith("attention.v_proj.bias"))] += 1.0
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(DinoprobeError, match="non-zero v biases.*_qkvb"):
        build_backbone(MODEL, str(tmp_path / "hf"), SIZE, log=lambda *_: None)


def test_a_hugging_face_config_that_is_not_a_config_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    for text, message in (("[1, 2]", "not a model config"), ("{bad", "not valid JSON"),
                          ("[" * 200_000 + "]" * 200_000, "nested too deeply")):
        (tmp_path / "hf" / "config.json").write_text(text)
        with pytest.raises(DinoprobeError, match=message):
            build_backbone(MODEL, str(tmp_path / "hf"), SIZE, log=lambda *_: None)


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path, backbone):
    state = dict(backbone.model.state_dict())
    state.pop("norm.weight")
    state["head.weight"] = torch.zeros(10, 384)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DinoprobeError) as err:
        build_backbone(MODEL, str(tmp_path / "bad.pth"), SIZE)
    assert "missing keys: norm.weight" in str(err.value) and "unexpected keys: head.weight" in str(err.value)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/dinoprobe-pwned",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    import os

    if os.path.exists("/tmp/dinoprobe-pwned"):
        os.unlink("/tmp/dinoprobe-pwned")
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(DinoprobeError, match="cannot read weights"):
        build_backbone(MODEL, str(tmp_path / "evil.pth"), SIZE)
    assert not os.path.exists("/tmp/dinoprobe-pwned")


def test_load_strict_rejects_shape_mismatch(backbone):
    state = dict(backbone.model.state_dict())
    state["norm.weight"] = torch.zeros(10)
    with pytest.raises(DinoprobeError, match="shape mismatches: norm.weight"):
        load_strict(backbone.model, state, "x")


def test_hub_offline_fails_fast_with_advice(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    start = time.perf_counter()
    with pytest.raises(DinoprobeError, match="--weights PATH"):
        build_backbone(MODEL, "hub", SIZE)
    assert time.perf_counter() - start < 10


def test_info_reports_201_tokens_at_224_and_measured_flops():
    proc = run_cli("info", "--image-size", 224, "--json", check=True)
    facts = json.loads(proc.stdout)
    assert facts["tokens"] == 201 and facts["patch_tokens"] == 196 and facts["register_tokens"] == 4
    assert facts["parameters"] == 21_586_944 and facts["trainable_parameters"] == 0
    assert (facts["width"], facts["depth"], facts["heads"], facts["mlp_width"]) == (384, 12, 6, 1536)
    tokens, width, layers, mlp, patches = 201, 384, 12, 1536, 196  # every matmul of a forward pass, counted by hand
    by_hand = layers * (2 * tokens * width * 3 * width + 2 * tokens * width * width + 2 * 2 * tokens * width * mlp
                        + 2 * 2 * tokens * tokens * width) + 2 * patches * 3 * 16 * 16 * width
    assert facts["flops_per_image"] == by_hand  # attention's QK^T and AV included
    loaded = json.loads(run_cli("info", "--image-size", 224, "--weights", "random", "--json", check=True).stdout)
    assert loaded["flops_per_image"] == facts["flops_per_image"]  # the same count whether weights are loaded or not
    table = run_cli("info", check=True).stdout
    assert "201 = 196 patches + 1 CLS + 4 registers" in table


def test_info_without_weights_allocates_nothing_even_for_vit_7b():
    """Architecture facts come from the meta device: ViT-7B/16's 25 GiB of weights were allocated (and initialised)
    just to count them, which no laptop and no CI machine holds."""
    facts = json.loads(run_cli("info", "--model", "vit_7b_patch16_dinov3", "--json", check=True).stdout)
    assert facts["parameters"] == 6_716_030_976 and facts["width"] == 4096 and facts["depth"] == 40
    assert 6_716_030_976 * 4 <= facts["weights_bytes_float32"] < 6_716_030_976 * 4 * 1.001
    assert "weights in float32   25 GiB" in run_cli("info", "--model", "vit_7b_patch16_dinov3", check=True).stdout


def test_each_architecture_is_a_model_of_its_own():
    """The meta-device skeleton is built once per model and size: what a caller changes in one is not in the next."""
    from dinoprobe.extract.backbone import meta_model

    first = meta_model(MODEL, 32)
    first.blocks = first.blocks[:1]
    assert len(meta_model(MODEL, 32).blocks) == 12 and meta_model(MODEL, 64).patch_embed.img_size == (64, 64)


def test_model_facts_scale_with_image_size(backbone):
    assert model_facts(backbone)["tokens"] == 4 + 5


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    assert_clean_error(run_cli("info", "--model", "no_such_model"), "unknown model")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert_clean_error(run_cli("info", "--weights", tmp_path / "junk.pth"), "cannot read weights")
    assert_clean_error(run_cli("info", "--weights", tmp_path / "missing.pth"), "does not exist")



def test_a_backbone_the_host_cannot_hold_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """ViT-7B/16 (27 GB of float32 weights) on a 23 GB machine: `features` was ended by the OOM killer, exit 137 and
    not a word. The shapes come from the meta device; a checkpoint read whole beside the model counts twice. Here the
    host is made too small for ViT-S/16 (87 MB of weights)."""
    from dinoprobe.extract import backbone as backbone_module

    devices, real = [], backbone_module.create_model
    backbone_module._meta_model.cache_clear()  # the skeleton is built once per process: here, now
    monkeypatch.setattr(backbone_module, "create_model",
                        lambda *a: devices.append(torch.empty(0).device.type) or real(*a))
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 60 * 2**20)
    with pytest.raises(DinoprobeError, match=r"needs about 0\.08\d* GiB .*0\.08\d* GiB in float32\) and 0\.0586 GiB are") as err:
        build_backbone(MODEL, "random", SIZE)
    assert "checkpoint" not in str(err.value) and devices == ["meta"]
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 120 * 2**20)
    build_backbone(MODEL, "random", SIZE, log=lambda *_: None)  # one copy fits
    # torchrun ranks of one machine each load a copy at once: two do not fit where one does
    with pytest.raises(DinoprobeError, match=r"in each of 2 processes.*or fewer processes per machine"):
        build_backbone(MODEL, "random", SIZE, processes=2)
    proc = run_cli("features", "--data", make_folder(tmp_path / "d", per_class=2), "--weights", "random",
                   "--image-size", SIZE, "--cache", tmp_path / "c", env={"LOCAL_WORLD_SIZE": "2"})
    assert_clean_error(proc, "in each of 2 processes")
    proc = run_cli("features", "--data", tmp_path / "d", "--weights", "random", "--image-size", SIZE, "--cache",
                   tmp_path / "c", env={"LOCAL_WORLD_SIZE": "two"})
    assert_clean_error(proc, "LOCAL_WORLD_SIZE='two' is not a number of processes")
    (tmp_path / "w.safetensors").write_bytes(b"")  # refused before it is read: its weights would be a second copy
    with pytest.raises(DinoprobeError, match=r"needs about 0\.16\d* GiB .*as many again for the checkpoint"):
        build_backbone(MODEL, str(tmp_path / "w.safetensors"), SIZE)
    assert_clean_error(run_cli("info", "--model", MODEL, "--weights", tmp_path / "w.safetensors"),
                       "choose a smaller --model")


FORWARD_PEAK = """
import sys, torch
from dinoprobe.extract.backbone import build_backbone, forward_bytes
backbone = build_backbone("vit_small_patch16_dinov3", "random", 224, log=lambda *_: None)
backbone.last_blocks = 4  # as `features` runs it
pixels = torch.rand(16, 3, 224, 224)
status = lambda key: [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key)][0]
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the resident peak starts again from here
with torch.inference_mode():
    backbone(pixels)
print(status("VmHWM") - before, forward_bytes(backbone, 16) - 16 * 4 * 3 * 224 * 224)  # the pixels exist already
"""


def test_a_cpu_forward_pass_is_counted_at_no_less_than_its_measured_peak():
    """The estimate behind the batch-size check, against the resident peak of a first forward pass of 16 images at
    224 px (what later passes reuse is allocated there), in three fresh processes side by side: it varies run to
    run (measured 105-182 MB over 30 processes; counted 247)."""

    runs = [processes.Process(["-c", FORWARD_PEAK])
            for _ in range(3)]
    measured = [tuple(map(int, run.communicate(timeout=300)[0].split())) for run in runs]
    peaks, counted = [peak for peak, _ in measured], measured[0][1]
    assert max(peaks) <= counted <= 3 * min(peaks), (peaks, counted)


def test_a_batch_the_host_cannot_run_on_a_cpu_is_refused_naming_one_that_fits(tmp_path, monkeypatch, photos):
    """ViT-H+/16 at 512 px takes about 15 GB for a batch of 64 on a CPU: the OOM killer ended such runs without a
    word. Here the host is made too small for ViT-S/16's batch of 64 at 224 px (about 1 GiB counted)."""
    from dinoprobe.extract import backbone as backbone_module

    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 200 * 2**20)
    proc = run_cli("features", "--data", photos, "--weights", "random", "--image-size", 224, "--cache", tmp_path / "c",
                   "--batch-size", 64, "--device", "cpu")
    assert_clean_error(proc, "a batch of 64 images at 224 px", "needs about 0.992", "use --batch-size 12 or less")
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    run_cli("features", "--data", photos, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "c",
            "--workers", 0, check=True)
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 1, check=True)
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 100 * 2**20)  # the weights fit
    proc = run_cli("predict", "--run", tmp_path / "r", photos / "val", "--batch-size", 512, "--device", "cpu")
    assert_clean_error(proc, f"a batch of 512 images at {SIZE} px", "or less")
    backbone = build_backbone(MODEL, "random", 224, log=lambda *_: None)
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 1 * 2**20)
    with pytest.raises(DinoprobeError, match="use a smaller --image-size or --model"):
        backbone_module.check_forward_fits(backbone, 1, torch.device("cpu"))
    backbone_module.check_forward_fits(backbone, 64, torch.device("cuda"))  # a GPU reports its own OutOfMemoryError
    # torchrun ranks on one machine each run a forward at once: two need twice the memory, so half the batch fits
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 3 * backbone_module.forward_bytes(backbone, 8))
    backbone_module.check_forward_fits(backbone, 16, torch.device("cpu"))
    with pytest.raises(DinoprobeError, match="in each of 2 processes .* use --batch-size 12 or less"):
        backbone_module.check_forward_fits(backbone, 16, torch.device("cpu"), processes=2)
