"""GGUF export: tiny Mistral 3 and Qwen2.5-VL runs converted, reloaded in llama.cpp and compared with transformers.

The llama.cpp build (pinned, see unsloth_med/gguf/llamacpp.py) is cached by version outside the per-session test
cache: $UNSLOTH_MED_LLAMA_CPP_DIR, else ~/.cache/unsloth_med/llama.cpp-<pin>-portable. CI keeps that folder, so it
pays the build (9 min on 2 quiet cores, more beside other tests) once per pin. Tests that need the build are slow.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from unsloth_med.cli.export import export_command
from unsloth_med.errors import ExportError
from unsloth_med.export import export_run
from unsloth_med.gguf import convert as gguf_convert
from unsloth_med.gguf import export as gguf_export
from unsloth_med.gguf import llamacpp

IMAGE_SIZE = 64
PERSISTENT_BUILD = (Path.home() / ".cache" / "unsloth_med"
                    / f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_VERSION}-{llamacpp.BUILD_FLAVOUR}")


@pytest.fixture(scope="session")
def llama_cpp_dir():
    """The pinned llama.cpp, built once (skipped only where cmake or a compiler is missing)."""
    os.environ.setdefault("UNSLOTH_MED_LLAMA_CPP_DIR", str(PERSISTENT_BUILD))
    if not llamacpp._built(llamacpp.BUILD_TARGETS):
        missing = llamacpp.missing_toolchain()
        if missing:
            pytest.skip(f"building llama.cpp needs {missing} (not on PATH)")
    llamacpp.ensure_built(llamacpp.LIBRARIES + ("llama-quantize",))
    return llamacpp.root()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's generated fracture X-rays (real Kaggle layout); the export checks on their test images."""
    from unsloth_med.data.synthetic import write_synthetic_fractures

    root = tmp_path_factory.mktemp("demo-data")
    write_synthetic_fractures(root, train_per_class=1, test_per_class=1)
    return root


def _tuned_run(tmp_path, tiny_path, family, data_dir) -> Path:
    """A run folder as the pipeline leaves it, with a LoRA adapter whose B weights are random (non-zero)."""
    from test_export import _build_tuned  # the same tuned tiny model the merged-export tests use

    _, model, processor, base = _build_tuned(tiny_path, family)
    run = tmp_path / f"run-{family}"
    model.save_pretrained(run / "adapter")
    processor.save_pretrained(run / "adapter")
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "base_model": base,
                                                                  "image_size": IMAGE_SIZE}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"model": base, "backend": "hf", "max_seq_length": 2048},
        "data": {"image_size": IMAGE_SIZE, "data_dir": str(data_dir) if data_dir else None},
        "training": {"seed": 3407}}))
    return run


def _check(result, family):
    out = Path(result["path"])
    verification = json.loads((out / "export.json").read_text())["verification"]
    assert verification["passed"] and not verification["problems"]
    assert verification["row_ids"][0] != "synthetic-0"  # the demo's test images, not generated stand-ins
    assert verification["max_abs_logit_diff"] <= verification["tolerance"]
    assert verification["argmax_agreement"] == 1.0
    assert verification["prompt_tokens_hf"] == verification["prompt_tokens_llama_cpp"]
    labels = verification["labels"]
    assert labels["prediction_agreement"] == 1.0 and labels["predicted_hf"] == labels["predicted_llama_cpp"]
    assert (out / result["text_gguf"]).is_file() and (out / result["mmproj_gguf"]).is_file()
    card = (out / "README.md").read_text()
    assert f"llama-mtmd-cli -m {result['text_gguf']} --mmproj {result['mmproj_gguf']} --jinja" in card
    assert "llama-server" in card and "ollama create" in card and (out / "Modelfile").is_file()
    return out, verification


@pytest.mark.slow
def test_gguf_export_of_tiny_mistral3_matches_transformers_in_llama_cpp(llama_cpp_dir, tiny_path, tmp_path, demo_data):
    run = _tuned_run(tmp_path, tiny_path, "mistral3", demo_data)
    assert export_command([str(run), "--format", "gguf"]) == 0
    result = json.loads((run / "gguf" / "export.json").read_text())
    out, verification = _check({**result, "path": str(run / "gguf")}, "mistral3")
    assert verification["tolerance"] < 2e-3  # f16: about 1e-3
    # The [IMG_BREAK] row reached the mmproj (the converter alone drops it).
    assert b"v.token_embd.img_break" in (out / result["mmproj_gguf"]).read_bytes()
    assert 'tokenizer.chat_template' in (out / result["text_gguf"]).read_bytes()[:200_000].decode("latin-1")

    # A loud failure: the base model's GGUF (adapter not merged) disagrees with the tuned reference.
    import transformers

    from unsloth_med.data.images import load_image
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.models.families import family_of
    from unsloth_med.recipes.bone_fracture import RECIPE

    base_dir = tmp_path / "base-gguf"
    base_dir.mkdir()
    gguf_export.convert(Path(tiny_path("mistral3")), base_dir / "base.gguf", base_dir / "mmproj.gguf", "f16")
    merged = run / "merged"
    model = transformers.AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(merged)
    rows = load_recipe_data(RECIPE, demo_data, seed=3407)["test"]
    images = [load_image(rows[i]["image"], IMAGE_SIZE) for i in range(2)]
    reference = gguf_export._hf_reference(model, processor, RECIPE, images, family_of(model.config))
    prompt = gguf_export._prompt_for_llama(processor, RECIPE, "mistral3")
    llama = gguf_export.run_in_llama_cpp(base_dir / "base.gguf", base_dir / "mmproj.gguf", images, prompt,
                                         reference["answers"], {})
    wrong = gguf_export.compare(reference, llama, "f16", "mistral3", labels=RECIPE.labels)
    assert not wrong["passed"] and any("logit difference" in p for p in wrong["problems"])


@pytest.mark.slow
def test_gguf_export_of_tiny_qwen2_5_vl_matches_transformers_in_llama_cpp(llama_cpp_dir, tiny_path, tmp_path,
                                                                          demo_data):
    run = _tuned_run(tmp_path, tiny_path, "qwen2_5_vl", demo_data)
    result = export_run(run, format="gguf")
    out, verification = _check(result, "qwen2_5_vl")
    assert result["image_tokens"]["image_min_tokens"] >= 1
    assert "--image-min-tokens" in result["usage"]["llama-mtmd-cli"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantised_gguf_export_keeps_argmax_and_labels(quant, llama_cpp_dir, tiny_path, tmp_path, demo_data):
    """llama-quantize's types, run in llama.cpp (the native build died with SIGILL on them: see llamacpp.py)."""
    run = _tuned_run(tmp_path, tiny_path, "mistral3", demo_data)
    f16 = export_run(run, format="gguf", out=str(tmp_path / "f16"))
    quantised = export_run(run, format="gguf", quant=quant, out=str(tmp_path / quant))
    _check(quantised, "mistral3")
    assert quantised["text_gguf"].endswith(f"-{gguf_export.QUANTIZE_TYPE[quant]}.gguf")
    size = (Path(quantised["path"]) / quantised["text_gguf"]).stat().st_size
    assert size < (Path(f16["path"]) / f16["text_gguf"]).stat().st_size
    atol, rtol = gguf_export.TOLERANCES[quant]
    assert quantised["verification"]["tolerance_rule"] == f"{atol:g} + {rtol:g} * max|logit|"


@pytest.mark.slow
def test_converter_fixes_let_the_tiny_mistral3_convert(tiny_path, tmp_path):
    """Only the converter (no build): a 2-layer vision tower, a locally trained BPE tokenizer, [IMG_BREAK]."""
    os.environ.setdefault("UNSLOTH_MED_LLAMA_CPP_DIR", str(PERSISTENT_BUILD))
    gguf_export.convert(Path(tiny_path("mistral3")), tmp_path / "text.gguf", tmp_path / "mmproj.gguf", "f16")
    text, mmproj = (tmp_path / "text.gguf").read_bytes(), (tmp_path / "mmproj.gguf").read_bytes()
    assert b"tokenizer.ggml.pre" in text and b"gpt-2" in text and b"tokenizer.chat_template" in text
    assert b"[INST]" in text  # the family's training template, applied by llama.cpp with --jinja
    assert b"mm.2.weight" in mmproj  # multi_modal_projector.linear_2 mapped although the tower has 2 layers
    assert b"v.token_embd.img_break" in mmproj


def test_mllama_run_is_refused_with_a_clear_message_before_any_work(tiny_path, tmp_path):
    run = _tuned_run(tmp_path, tiny_path, "mllama", None)
    with pytest.raises(ExportError, match="Llama 3.2 Vision .mllama. cannot be exported to GGUF"):
        export_run(run, format="gguf")
    assert not (run / "merged").exists() and not (run / "gguf").exists()


def test_unknown_quant_type_is_a_clear_error(tiny_path, tmp_path):
    with pytest.raises(ExportError, match="Unknown GGUF type 'q2_k'"):
        export_run(tmp_path, format="gguf", quant="q2_k")


def test_pre_tokenizer_fallback_only_for_the_gpt2_byte_level_split(tiny_path, tmp_path):
    tiny = Path(tiny_path("mistral3"))
    assert gguf_convert._gpt2_pre_tokenizer(tiny)
    other = tmp_path / "metaspace"
    other.mkdir()
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert not gguf_convert._gpt2_pre_tokenizer(other)


def test_missing_toolchain_says_what_and_gives_the_build_commands(tmp_path, monkeypatch):
    """No cmake/compiler on PATH and no build yet: a clear message with the exact commands, not a traceback."""
    monkeypatch.setenv("UNSLOTH_MED_LLAMA_CPP_DIR", str(tmp_path / "llama.cpp"))
    (tmp_path / "llama.cpp" / "src").mkdir(parents=True)
    (tmp_path / "llama.cpp" / "src" / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "llama.cpp" / "python" / "llama_cpp").mkdir(parents=True)
    (tmp_path / "llama.cpp" / "python" / "llama_cpp" / "mtmd_cpp.py").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ExportError) as info:
        llamacpp.ensure_built()
    message = str(info.value)
    assert "cmake" in message and "apt-get install cmake build-essential" in message
    assert f"cmake --build {tmp_path / 'llama.cpp' / 'build'} --target mtmd -j 2" in message
    assert shutil.which("cmake") is None
