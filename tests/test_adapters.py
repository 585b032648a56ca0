"""Adapter bundle: save/load round trip, apply/unload on a tiny pipeline, every loader
error, and the importer for the authors' checkpoint format (never unpickling code)."""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffmix_core import weights
from diffmix_core.apply import apply_bundle, check_base, set_lora_enabled, unload_bundle
from diffmix_core.authors import import_diffmix
from diffmix_core.bundle import DEFAULT_TEMPLATE, load_bundle, make_prompt, save_bundle
from diffmix_core.records import sha256_file
from diffmix_core.weights import check_lora_fits
from helpers import (CLASSES, TARGETS, TOKENS, WIDTH, Payload, add_random_lora, authors_checkpoint, random_vectors,
                     to_old_keys)


# --------------------------------------------------------------------------- helpers
def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)  # (B, C, h, w) latents
    context = torch.randn(1, 5, WIDTH, generator=g)  # (B, T, D) text states
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=context).sample


def _text_out(pipe, prompt: str = "a photo of a sparrow bird") -> torch.Tensor:
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _state(pipe) -> dict:
    """What 'the pipeline is unchanged' compares."""
    return {"unet": _unet_out(pipe), "text": _text_out(pipe), "vocab": len(pipe.tokenizer),
            "rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
            "adapters": pipe.get_list_adapters(), "bundle": getattr(pipe, "diffmix_bundle", None)}


def _assert_same_state(a: dict, b: dict) -> None:
    assert torch.equal(a["unet"], b["unet"]) and torch.equal(a["text"], b["text"])
    assert (a["vocab"], a["rows"], a["adapters"], a["bundle"]) == (b["vocab"], b["rows"], b["adapters"], b["bundle"])


def _rewrite_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "adapter.json").read_text())
    meta.update(changes)
    (folder / "adapter.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def lora_case(tiny_model_dir):
    """A 'trained' tiny model: base output, LoRA weights and the output with them."""
    from diffmix_core.models import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")
    base = _unet_out(pipe)
    add_random_lora(pipe.unet)
    from peft import get_peft_model_state_dict

    return types.SimpleNamespace(
        base=base, trained=_unet_out(pipe), lora=weights.lora_state_dict_from_unet(pipe.unet),
        peft=get_peft_model_state_dict(pipe.unet))


@pytest.fixture
def bundle_dir(tmp_path, tiny_model_dir, lora_case) -> Path:
    save_bundle(tmp_path / "bundle", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                lora_state_dict=lora_case.lora, base_model=str(tiny_model_dir), superclass="bird",
                resolution=32, training={"lr": 5e-5}, steps=2)
    return tmp_path / "bundle"


# --------------------------------------------------------------------------- prompts
def test_make_prompt():
    assert make_prompt("<class_0>", "bird") == "a photo of a <class_0> bird"
    assert make_prompt("sparrow") == "a photo of a sparrow"  # empty superclass: no double space
    assert make_prompt("x", "", "{word} , {superclass}  photo") == "x , photo"
    assert DEFAULT_TEMPLATE == "a photo of a {word} {superclass}"
    for bad in ("a photo of {}", "a {superclass}", "a {word} {name}", "a {word"):
        with pytest.raises(ValueError, match="template"):
            make_prompt("x", "bird", bad)


# --------------------------------------------------------------------------- round trip
def test_bundle_files_and_properties(bundle_dir, tiny_model_dir):
    b = load_bundle(bundle_dir)
    assert b.classes == tuple(CLASSES) and b.tokens == tuple(TOKENS) and b.num_classes == 3
    assert b.base_model == str(Path(tiny_model_dir).resolve()) and b.base_revision is None and b.resolution == 32
    assert b.meta["lora"] == {"rank": 4, "alpha": 4.0} and b.meta["steps"] == 2
    assert b.lora_file == bundle_dir.resolve() / "pytorch_lora_weights.safetensors"
    assert sorted(b.meta["files"]) == ["embeddings/class_0.safetensors", "embeddings/class_1.safetensors",
                                       "embeddings/class_2.safetensors", "pytorch_lora_weights.safetensors"]
    assert b.hash == hashlib.sha256((bundle_dir / "adapter.json").read_bytes()).hexdigest()
    assert load_bundle(bundle_dir / "adapter.json") == b
    assert b.class_index("tern") == 2
    assert b.prompt("sparrow") == "a photo of a <class_1> bird"
    assert b.prompt("sparrow", use_token=False) == "a photo of a sparrow bird"
    with pytest.raises(ValueError, match="known classes: 'black footed albatross', 'sparrow'"):
        b.prompt("crow")
    # Files in the ecosystem's formats: diffusers LoRA keys, one {token: (D,)} per embedding.
    assert all(k.startswith("unet.") and ".lora." in k for k in load_file(b.lora_file))
    emb = load_file(b.embedding_file("<class_1>"))
    assert list(emb) == ["<class_1>"] and emb["<class_1>"].shape == (WIDTH,)


def test_apply_matches_trained_model_and_unload_restores_base(tiny_pipe, bundle_dir, lora_case):
    before = _state(tiny_pipe)
    assert torch.equal(before["unet"], lora_case.base)
    bundle = load_bundle(bundle_dir)
    apply_bundle(tiny_pipe, bundle)
    assert tiny_pipe.diffmix_bundle == bundle
    assert torch.allclose(_unet_out(tiny_pipe), lora_case.trained, atol=1e-6)
    # Each token is one new id whose embedding row is the bundle's vector.
    vocab_size = before["vocab"]
    ids = tiny_pipe.tokenizer(bundle.prompt("sparrow")).input_ids
    new = [i for i in ids if i >= vocab_size]
    assert new == [tiny_pipe.tokenizer.convert_tokens_to_ids("<class_1>")]
    rows = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[new[0]], random_vectors()["<class_1>"])
    assert torch.equal(_text_out(tiny_pipe), before["text"])  # base prompts unaffected
    apply_bundle(tiny_pipe, bundle)  # same bundle again: a no-op (diffusers would refuse the tokens)
    unload_bundle(tiny_pipe)
    _assert_same_state(_state(tiny_pipe), before)
    unload_bundle(tiny_pipe)  # nothing applied: a no-op


def test_embedding_file_loads_in_diffusers_directly(tiny_pipe, bundle_dir):
    file = load_bundle(bundle_dir).embedding_file("<class_1>")
    tiny_pipe.load_textual_inversion(str(file))  # token name read from the file
    row = tiny_pipe.text_encoder.get_input_embeddings().weight[tiny_pipe.tokenizer.convert_tokens_to_ids("<class_1>")]
    assert torch.equal(row, random_vectors()["<class_1>"])


def test_set_lora_enabled(tiny_pipe, bundle_dir, lora_case):
    apply_bundle(tiny_pipe, load_bundle(bundle_dir))
    set_lora_enabled(tiny_pipe, False)
    assert torch.equal(_unet_out(tiny_pipe), lora_case.base)
    assert tiny_pipe.tokenizer.convert_tokens_to_ids("<class_0>") >= 49408  # tokens stay
    set_lora_enabled(tiny_pipe, True)
    assert torch.allclose(_unet_out(tiny_pipe), lora_case.trained, atol=1e-6)


def test_applying_another_bundle_replaces_the_first(tiny_pipe, bundle_dir, tmp_path, tiny_model_dir, lora_case):
    ti_only = save_bundle(tmp_path / "ti", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(seed=9),
                          lora_state_dict=None, base_model=str(tiny_model_dir))
    assert ti_only.lora_file is None and ti_only.meta["lora"] is None
    apply_bundle(tiny_pipe, load_bundle(bundle_dir))
    apply_bundle(tiny_pipe, ti_only)
    assert tiny_pipe.diffmix_bundle == ti_only
    assert torch.equal(_unet_out(tiny_pipe), lora_case.base)  # the first bundle's LoRA is gone
    row = tiny_pipe.text_encoder.get_input_embeddings().weight[tiny_pipe.tokenizer.convert_tokens_to_ids("<class_2>")]
    assert torch.equal(row, random_vectors(seed=9)["<class_2>"])
    set_lora_enabled(tiny_pipe, False)  # no LoRA loaded: harmless


def test_lora_alpha_other_than_rank_is_kept(tiny_pipe, tmp_path, tiny_model_dir, lora_case):
    from peft import LoraConfig, set_peft_model_state_dict

    tiny_pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    set_peft_model_state_dict(tiny_pipe.unet, lora_case.peft)
    expected = _unet_out(tiny_pipe)
    tiny_pipe.unet.unload_lora()
    bundle = save_bundle(tmp_path / "b", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                         lora_state_dict=lora_case.peft, lora_alpha=8, base_model=str(tiny_model_dir))
    assert bundle.meta["lora"] == {"rank": 4, "alpha": 8.0}
    apply_bundle(tiny_pipe, bundle)
    assert torch.allclose(_unet_out(tiny_pipe), expected, atol=1e-6)
    assert not torch.allclose(expected, lora_case.trained, atol=1e-4)


# --------------------------------------------------------------------------- loader errors
def test_class_without_token(bundle_dir):
    _rewrite_meta(bundle_dir, tokens=TOKENS[:2])
    with pytest.raises(ValueError, match=r"without a token: \['tern'\]"):
        load_bundle(bundle_dir)


def test_embedding_file_missing_its_token(bundle_dir):
    rel = "embeddings/class_1.safetensors"
    save_file({"<other>": torch.zeros(WIDTH)}, bundle_dir / rel)
    meta = json.loads((bundle_dir / "adapter.json").read_text())
    meta["files"][rel] = sha256_file(bundle_dir / rel)
    _rewrite_meta(bundle_dir, files=meta["files"])
    with pytest.raises(ValueError, match="exactly the token '<class_1>'"):
        load_bundle(bundle_dir)
    del meta["files"][rel]
    _rewrite_meta(bundle_dir, files=meta["files"])
    with pytest.raises(ValueError, match="<class_1> has no embedding"):
        load_bundle(bundle_dir)


def test_missing_files(bundle_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no adapter.json"):
        load_bundle(tmp_path)
    (bundle_dir / "embeddings/class_2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="class_2.safetensors"):
        load_bundle(bundle_dir)


def test_tampered_weight_file(bundle_dir):
    f = bundle_dir / "pytorch_lora_weights.safetensors"
    expected = json.loads((bundle_dir / "adapter.json").read_text())["files"][f.name]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"pytorch_lora_weights.safetensors.*expected {expected}, actual [0-9a-f]{{64}}"):
        load_bundle(bundle_dir)


def test_adapter_json_not_json_unknown_key_bad_version(bundle_dir):
    good = (bundle_dir / "adapter.json").read_text()
    (bundle_dir / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter.json is not JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / "adapter.json").write_text(good)
    _rewrite_meta(bundle_dir, colour="blue", extra_stuff=1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour', 'extra_stuff'\]"):
        load_bundle(bundle_dir)
    (bundle_dir / "adapter.json").write_text(good)
    _rewrite_meta(bundle_dir, format_version=2)
    with pytest.raises(ValueError, match="format_version 2"):
        load_bundle(bundle_dir)
    (bundle_dir / "adapter.json").write_text(good)
    _rewrite_meta(bundle_dir, examples="../../etc")
    with pytest.raises(ValueError, match="inside the bundle"):
        load_bundle(bundle_dir)


def test_wrong_embedding_width_leaves_pipe_unchanged(tiny_pipe, tmp_path, tiny_model_dir, lora_case):
    bundle = save_bundle(tmp_path / "b", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(width=16),
                         lora_state_dict=lora_case.lora, base_model=str(tiny_model_dir))
    before = _state(tiny_pipe)
    with pytest.raises(ValueError, match=r"embedding width 16 != the text encoder's hidden size 32"):
        apply_bundle(tiny_pipe, bundle)
    _assert_same_state(_state(tiny_pipe), before)


def _other_width_lora() -> dict[str, torch.Tensor]:
    """A rank-4 LoRA trained on a UNet of another width (16 instead of 32 channels)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    add_random_lora(unet)
    return weights.lora_state_dict_from_unet(unet)


def test_lora_that_does_not_fit(tiny_pipe, lora_case, tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"to_q: expected down \(4, 32\) / up \(32, 4\), found down \(4, 16\)"):
        check_lora_fits(tiny_pipe.unet, _other_width_lora())
    k = next(k for k in lora_case.lora if ".attn1.to_q." in k)
    ghost = {kk.replace(".attn1.to_q.", ".attn9.to_q."): v for kk, v in lora_case.lora.items()}
    with pytest.raises(ValueError, match=r"attn9.to_q: no such module"):
        check_lora_fits(tiny_pipe.unet, ghost)
    uneven = dict(lora_case.lora)
    uneven[k.replace(".down.", ".up.")] = uneven[k.replace(".down.", ".up.")][:, :3]
    with pytest.raises(ValueError, match=r"found down \(4, 32\) / up \(32, 3\)"):
        check_lora_fits(tiny_pipe.unet, uneven)
    with pytest.raises(ValueError, match="not UNet LoRA weights"):
        check_lora_fits(tiny_pipe.unet, {"text_encoder.x.weight": torch.zeros(1)})
    # apply checks before loading: a misfit bundle changes nothing
    bundle = save_bundle(tmp_path / "b", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                         lora_state_dict=_other_width_lora(), base_model=str(tiny_model_dir))
    before = _state(tiny_pipe)
    with pytest.raises(ValueError, match="does not fit this UNet"):
        apply_bundle(tiny_pipe, bundle)
    _assert_same_state(_state(tiny_pipe), before)


def test_failed_apply_keeps_the_previous_bundle(tiny_pipe, bundle_dir, tmp_path, tiny_model_dir):
    apply_bundle(tiny_pipe, load_bundle(bundle_dir))
    bad = save_bundle(tmp_path / "bad", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                      lora_state_dict=_other_width_lora(), base_model=str(tiny_model_dir))
    before = _state(tiny_pipe)
    with pytest.raises(ValueError):
        apply_bundle(tiny_pipe, bad)
    _assert_same_state(_state(tiny_pipe), before)


def test_base_model_mismatch(tiny_pipe, tmp_path, lora_case):
    bundle = save_bundle(tmp_path / "b", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                         lora_state_dict=lora_case.lora, base_model="someone/other-sd", base_revision="v2")
    before = _state(tiny_pipe)
    with pytest.raises(ValueError, match=r"trained on someone/other-sd@v2 but the pipeline is .*tiny-sd.*allow-base-mismatch"):
        apply_bundle(tiny_pipe, bundle)
    _assert_same_state(_state(tiny_pipe), before)
    with pytest.warns(UserWarning, match="applying anyway"):
        check_base(tiny_pipe, bundle, allow_mismatch=True)
    with pytest.warns(UserWarning):
        apply_bundle(tiny_pipe, bundle, allow_base_mismatch=True)
    assert torch.allclose(_unet_out(tiny_pipe), lora_case.trained, atol=1e-6)


def test_save_bundle_rejects_bad_input(tmp_path, lora_case):
    kw = dict(lora_state_dict=None, base_model="m", embeddings=random_vectors())
    with pytest.raises(ValueError, match="unique"):
        save_bundle(tmp_path / "a", classes=["a", "a", "b"], tokens=TOKENS, **kw)
    with pytest.raises(ValueError, match="whitespace"):
        save_bundle(tmp_path / "a", classes=CLASSES, tokens=["<a b>", "<c>", "<d>"], **kw)
    with pytest.raises(ValueError, match=r"missing \['<class_2>'\]"):
        save_bundle(tmp_path / "a", classes=CLASSES, tokens=TOKENS, lora_state_dict=None, base_model="m",
                    embeddings={t: v for t, v in random_vectors().items() if t != "<class_2>"})
    with pytest.raises(ValueError, match=r"unknown extra key\(s\) \['colour'\]"):
        save_bundle(tmp_path / "a", classes=CLASSES, tokens=TOKENS, extra={"colour": 1}, **kw)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_bundle(tmp_path / "a", classes=CLASSES, tokens=TOKENS, training={"x": object()}, **kw)
    with pytest.raises(ValueError, match="lora_rank=8 but the LoRA weights have rank 4"):
        save_bundle(tmp_path / "a", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(), base_model="m",
                    lora_state_dict=lora_case.lora, lora_rank=8)
    assert not (tmp_path / "a").exists()  # nothing written
    b = save_bundle(tmp_path / "p", classes=CLASSES, tokens=TOKENS, training={"out": tmp_path}, **kw)
    assert b.meta["training"] == {"out": str(tmp_path)}


# --------------------------------------------------------------------------- importer
def test_import_authors_checkpoint(tiny_pipe, tmp_path, tiny_model_dir, lora_case):
    old = to_old_keys(lora_case.lora)
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    emb_file = authors_checkpoint(tmp_path / "ckpt", old)
    bundle = import_diffmix(emb_file, tmp_path / "ckpt", base_model=str(tiny_model_dir), superclass="bird",
                            out_dir=tmp_path / "bundle")
    assert bundle.classes == ("Black_footed_Albatross", "Sparrow", "Tern")  # by placeholder number, names as given
    assert bundle.tokens == ("<class_0>", "<class_2>", "<class_10>")
    assert bundle.meta["lora"] == {"rank": 4, "alpha": 4.0}
    assert bundle.resolution == 32      # the tiny base's own default, not a hard-coded 512
    assert bundle.prompt("Tern") == "a photo of a <class_10> bird"
    apply_bundle(tiny_pipe, load_bundle(tmp_path / "bundle"))
    assert torch.allclose(_unet_out(tiny_pipe), lora_case.trained, atol=1e-6)
    authors = torch.load(emb_file, weights_only=True)["learned_embeds_dict"]
    row = tiny_pipe.text_encoder.get_input_embeddings().weight[tiny_pipe.tokenizer.convert_tokens_to_ids("<class_10>")]
    assert torch.equal(row, authors["<class_10>"])


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_import_accepts_newer_lora_keys(tmp_path, tiny_model_dir, lora_case, fmt):
    lora = lora_case.lora if fmt == "diffusers" else lora_case.peft
    emb_file = authors_checkpoint(tmp_path / "ckpt", lora)
    bundle = import_diffmix(emb_file, tmp_path / "ckpt" / "pytorch_lora_weights.safetensors",
                            base_model=str(tiny_model_dir), superclass="", out_dir=tmp_path / "b")
    assert load_file(bundle.lora_file).keys() == lora_case.lora.keys()


def test_import_rejects_inconsistent_checkpoints(tmp_path, lora_case):
    emb_file = authors_checkpoint(tmp_path / "ckpt", lora_case.lora)
    data = torch.load(emb_file, weights_only=True)
    data["placeholder2name"]["<class_0>"] = "Crow"
    torch.save(data, tmp_path / "bad1.bin")
    with pytest.raises(ValueError, match="disagree"):
        import_diffmix(tmp_path / "bad1.bin", None, base_model="m", superclass="bird", out_dir=tmp_path / "o")
    data = torch.load(emb_file, weights_only=True)
    data["learned_embeds_dict"]["<class_2>"] = torch.zeros(16)
    torch.save(data, tmp_path / "bad2.bin")
    with pytest.raises(ValueError, match="one width"):
        import_diffmix(tmp_path / "bad2.bin", None, base_model="m", superclass="bird", out_dir=tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        import_diffmix(tmp_path / "missing.bin", None, base_model="m", superclass="bird", out_dir=tmp_path / "o")


def test_importer_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "learned_embeds.bin"
    torch.save({"learned_embeds_dict": {"<class_0>": Payload(marker)}, "name2placeholder": {"a": "<class_0>"}}, evil)
    with pytest.raises(ValueError, match="not a plain weights file"):
        import_diffmix(evil, None, base_model="m", superclass="bird", out_dir=tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_base_model_relative_to_the_bundle_moves_with_it(tmp_path, tiny_model_dir, lora_case):
    """A shipped world (assets/demo/{base,bundle}) names its base as '../base' and can be moved."""
    import shutil

    from diffmix_core.models import load_pipeline

    world = tmp_path / "world"
    shutil.copytree(tiny_model_dir, world / "base")
    save_bundle(world / "bundle", classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(),
                lora_state_dict=lora_case.lora, base_model="../base", resolution=32)
    assert json.loads((world / "bundle" / "adapter.json").read_text())["base_model"]["model"] == "../base"
    moved = tmp_path / "elsewhere"
    shutil.move(world, moved)
    bundle = load_bundle(moved / "bundle")
    assert bundle.base_model == str((moved / "base").resolve())
    apply_bundle(load_pipeline(bundle.base_model, device="cpu"), bundle)   # no base-mismatch error
