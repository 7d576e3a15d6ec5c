"""Merged 16-bit export from the hf backend: reload with plain transformers, logits, processor, atomicity, secrets."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unsloth_med.backends.hf import HFBackend
from unsloth_med.cli.export import export_command
from unsloth_med.config import LoraArgs, ModelArgs
from unsloth_med.errors import ExportError, NetworkError
from unsloth_med.export import export_merged, export_run
from unsloth_med.export import merge as export_merge
from unsloth_med.export import verify as export_verify
from unsloth_med.recipes.bone_fracture import RECIPE

IMAGE_SIZE = 64
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtokenForTestsOnly0123456789abcd", "KAGGLE_KEY": "kagglefakekey0123456789abcdef",
                "HUGGING_FACE_HUB_TOKEN": "hf_FAKEsecondTokenForTests987654321zz"}
MARKERS = {"mistral3": "[INST]", "mllama": "<|start_header_id|>user<|end_header_id|>", "qwen2_5_vl": "<|im_start|>user",
           "gemma3": "<start_of_turn>user"}


def _rows(n=3):
    rows = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (80, 96, 3)).astype("uint8")
        rows.append({"image": Image.fromarray(pixels), "target": RECIPE.labels[i], "id": f"row{i}"})
    return rows


@pytest.fixture(scope="module", autouse=True)
def fast_tiny_models():
    """Fewer generated tokens per verification row (the tiny random models never stop early), and one
    CPU thread: tiny matrices gain nothing from more, and on a busy 2-core machine two OpenMP threads
    spin against each other (an export took 24 s instead of 2.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_verify, "MAX_VERIFY_NEW_TOKENS", 4)
        yield
    torch.set_num_threads(threads)


_TUNED: dict = {}


def _tuned(tiny_path, family):
    """A tiny model with LoRA adapters whose B weights are random (non-zero), so the adapter changes outputs.

    Built once per family: exports only read the model (and put it in eval mode).
    """
    if family not in _TUNED:
        _TUNED[family] = _build_tuned(tiny_path, family)
    return _TUNED[family]


def _build_tuned(tiny_path, family):
    backend = HFBackend()
    base = str(tiny_path(family))
    model, processor = backend.load(base, ModelArgs())
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    model.eval()
    return backend, model, processor, base


def _batch(processor, rows):
    from unsloth_med.data.images import load_image
    from unsloth_med.models import prompting

    texts = [prompting.render(processor, RECIPE.to_conversation(r)) for r in rows]
    return prompting.encode(processor, texts, [load_image(r["image"], IMAGE_SIZE) for r in rows])


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module", params=["mistral3", "mllama", "qwen2_5_vl", "gemma3"])
def exported(request, tiny_path, tmp_path_factory):
    backend, model, processor, base = _tuned(tiny_path, request.param)
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "merged"
    result = export_merged(backend, model, processor, RECIPE, _rows(), out, image_size=IMAGE_SIZE, base_model=base)
    return request.param, model, processor, out, result


def test_merged_export_reloads_with_plain_transformers_and_matches_base_plus_adapter(exported):
    from transformers import AutoModelForImageTextToText

    family, tuned, processor, out, result = exported
    assert result["path"] == str(out) and (out / "export.json").is_file()
    assert json.loads((out / "export.json").read_text())["verification"]["passed"] is True
    assert result["verification"]["max_abs_logit_diff"] < 1e-4 and result["verification"]["greedy_agreement"] == 1.0
    assert result["dtype"] == "float32" and result["verification"]["reference"] == "the in-memory tuned model"

    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    batch = _batch(processor, _rows(4))
    merged, tuned_logits = _logits(reloaded, batch), _logits(tuned, batch)
    assert (merged - tuned_logits).abs().max().item() < 1e-4
    with tuned.disable_adapter():  # the adapter really changes the outputs, so the check above is not vacuous
        assert (_logits(tuned, batch) - tuned_logits).abs().max().item() > 1e-3

    info = json.loads((out / "unsloth_med.json").read_text())
    assert info["recipe"] == "bone_fracture" and info["image_size"] == IMAGE_SIZE and Path(info["base_model"]).is_dir()


def test_processor_reloads_and_applies_the_chat_template(exported):
    from transformers import AutoProcessor

    family, _, processor, out, _ = exported
    reloaded = AutoProcessor.from_pretrained(out)
    assert (out / "chat_template.jinja").is_file() and reloaded.chat_template == processor.chat_template
    text = reloaded.apply_chat_template(RECIPE.prompt(), tokenize=False, add_generation_prompt=True)
    assert MARKERS[family] in text and RECIPE.instruction in text
    assert reloaded.tokenizer.pad_token is not None
    batch = _batch(reloaded, _rows(2))
    assert torch.equal(batch["input_ids"], _batch(processor, _rows(2))["input_ids"])
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "educational and research use only" in card
    assert "diagnosis, clinical decision-making or patient care" in card


def _interrupting_save(error):
    def save(directory, *args, **kwargs):
        Path(directory, "tokenizer.json").write_text("{}")  # the weights and a file are on disk, then it fails
        raise error

    return save


@pytest.mark.parametrize("error, raised",
                         [(OSError(28, "No space left on device"), ExportError),  # a full disk: our error
                          (KeyboardInterrupt(), KeyboardInterrupt)])
def test_interrupted_export_leaves_no_complete_looking_folder(tiny_path, tmp_path, monkeypatch, error, raised):
    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.partial-999999999-0123abcd"  # left by an export killed earlier (no such pid)
    stale.mkdir()
    monkeypatch.setattr(processor, "save_pretrained", _interrupting_save(error))
    with pytest.raises(raised):
        export_merged(backend, model, processor, RECIPE, _rows(), out, image_size=IMAGE_SIZE, base_model=base)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "partial folders must be removed"

    # A previous, complete export stays untouched when a new one fails.
    out.mkdir()
    (out / "export.json").write_text('{"previous": true}')
    with pytest.raises(raised):
        export_merged(backend, model, processor, RECIPE, _rows(), out, image_size=IMAGE_SIZE, base_model=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert json.loads((out / "export.json").read_text()) == {"previous": True}


def _tamper_with_the_merge(monkeypatch, change):
    """The export merges an adapter whose lora_B weights went through `change` (a merge bug, simulated)."""
    real = export_merge._merge_on_16bit_base

    def tampered(model, base_model, dtype, recipe):
        peft_model, name = real(model, base_model, dtype, recipe)
        with torch.no_grad():
            for n, w in peft_model.named_parameters():
                if "lora_B" in n:
                    change(w)
        return peft_model, name

    monkeypatch.setattr(export_merge, "_merge_on_16bit_base", tampered)


def test_an_unmerged_adapter_fails_verification_loudly(tiny_path, tmp_path, monkeypatch):
    """The most reported merged-export bug: base weights saved without the LoRA merged."""
    backend, model, processor, base = _tuned(tiny_path, "mllama")
    _tamper_with_the_merge(monkeypatch, lambda w: w.zero_())
    with pytest.raises(ExportError, match="disagrees"):
        export_merged(backend, model, processor, RECIPE, _rows(), tmp_path / "merged", image_size=IMAGE_SIZE,
                      base_model=base)
    assert list(tmp_path.iterdir()) == []


def _fake_run(tmp_path, model, processor, base) -> Path:
    """A run folder as the pipeline leaves it: adapter/, config.yaml, metrics.json."""
    run = tmp_path / "run"
    adapter = run / "adapter"
    model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    (adapter / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "base_model": base,
                                                          "image_size": IMAGE_SIZE}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"model": base, "backend": "hf", "load_in_4bit": None, "max_seq_length": 2048},
        "lora": {"lora_r": 16, "lora_alpha": 16}, "data": {"image_size": IMAGE_SIZE, "data_dir": None},
        "training": {"learning_rate": 2e-4, "max_steps": 30, "seed": 3407}}))
    (run / "metrics.json").write_text(json.dumps({"before": {"accuracy": 0.1, "macro_f1": 0.04},
                                                  "after": {"accuracy": 0.8571, "macro_f1": 0.83}, "test_size": 140}))
    return run


def test_no_secret_reaches_exported_or_logged_files(tiny_path, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # unroutable: nothing leaves this machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    log_file = tmp_path / "run.log"
    handler = logging.FileHandler(log_file)  # deliberately no RedactingFilter: nothing may log a secret at all
    loggers = [logging.getLogger(n) for n in ("unsloth_med", "transformers", "peft", "huggingface_hub", "httpx")]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        backend, model, processor, base = _tuned(tiny_path, "mistral3")
        run = _fake_run(tmp_path, model, processor, base)
        export_merged(backend, model, processor, RECIPE, _rows(), run / "merged", image_size=IMAGE_SIZE,
                      base_model=base)
        with pytest.raises(NetworkError) as info:
            export_command([str(run), "--format", "adapter", "--push-to-hub", "someone/bone-fracture-tiny"])
    finally:
        for lg, level in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
    message = str(info.value)
    assert ("saved locally" in message
            and f"unsloth-med push {run / 'adapter-export'} someone/bone-fracture-tiny" in message)
    out, err = capsys.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {run / "merged" / "export.json", run / "adapter-export" / "README.md", log_file} <= set(files)
    assert log_file.stat().st_size > 0
    for value in FAKE_SECRETS.values():
        assert value not in message + out + err
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{path} contains a secret"


def test_export_run_from_a_run_folder_adapter_and_merged(tiny_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    backend, model, processor, base = _tuned(tiny_path, "mllama")
    run = _fake_run(tmp_path, model, processor, base)

    assert export_command([str(run), "--format", "adapter"]) == 0
    adapter = run / "adapter-export"
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "0.8571" in card and "educational and research use only" in card
    assert json.loads((adapter / "export.json").read_text())["verification"]["files_identical_to_run"]

    result = export_run(run, format="merged-16bit", out=str(tmp_path / "elsewhere" / "merged"))
    assert result["path"] == str(tmp_path / "elsewhere" / "merged")
    assert result["verification"]["max_abs_logit_diff"] < 1e-4
    assert result["verification"]["row_ids"][0].startswith("synthetic")  # no data on disk: generated images
    batch = _batch(processor, _rows(2))
    plain_adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                                              str(adapter)).eval()
    merged = AutoModelForImageTextToText.from_pretrained(result["path"], dtype=torch.float32).eval()
    assert (_logits(merged, batch) - _logits(plain_adapter, batch)).abs().max().item() < 1e-4
    assert "0.8571" in Path(result["path"], "README.md").read_text()  # the run's metrics, wherever --out is


def test_adapter_export_of_a_generic_classify_run_keeps_its_labels(tiny_path, tmp_path):
    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    run = _fake_run(tmp_path, model, processor, base)
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({"recipe": "classify", "base_model": base,
                                                                  "image_size": IMAGE_SIZE, "image_buckets": True,
                                                                  "max_new_tokens": 5}))  # its --max_new_tokens
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].update(labels=["normal", "pneumonia"], instruction="Normal or pneumonia? {labels}")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = export_run(run, format="adapter")
    info = json.loads(Path(result["path"], "unsloth_med.json").read_text())
    assert info["recipe"] == "classify" and info["labels"] == ["normal", "pneumonia"]
    assert info["instruction"] == "Normal or pneumonia? normal, pneumonia"
    assert "Classes (2): normal, pneumonia" in Path(result["path"], "README.md").read_text()
    # the run padded its images into fixed shapes: the export says so, and predict on it sizes them the same way
    from unsloth_med.predict import load_for_inference

    assert info["image_buckets"] is True and load_for_inference(result["path"]).image_size.buckets is True
    # and evaluating or predicting with the export generates within the run's budget, not the recipe's default
    assert info["max_new_tokens"] == 5 and load_for_inference(result["path"]).recipe.max_new_tokens == 5

    # A run from before the adapter recorded its budget: unsloth_med.json holds the recipe's default, config.yaml the
    # run's --max_new_tokens 9, which the export keeps (it used the default before).
    meta = json.loads((run / "adapter" / "unsloth_med.json").read_text())
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({**meta, "max_new_tokens": 16}))
    config["eval"] = {**config.get("eval", {}), "max_new_tokens": 9}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    again = export_run(run, format="adapter")
    assert json.loads(Path(again["path"], "unsloth_med.json").read_text())["max_new_tokens"] == 9


def test_an_export_replaces_only_an_earlier_export_never_another_folder(tiny_path, tmp_path):
    """--out names a folder holding something else (or the run folder itself): refused before anything is written,
    that folder intact (it was moved aside and deleted). An earlier export at --out is replaced."""
    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    run = _fake_run(tmp_path, model, processor, base)
    mine = tmp_path / "models"
    (mine / "important").mkdir(parents=True)
    (mine / "important" / "keep.txt").write_text("data")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (mine, run):
        with pytest.raises(ExportError, match="holds no export .no export.json.; an export replaces"):
            export_run(run, format="adapter", out=str(out))
    assert (mine / "important" / "keep.txt").read_text() == "data"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    first = export_run(run, format="adapter", out=str(tmp_path / "export"))
    again = export_run(run, format="adapter", out=str(tmp_path / "export"))  # an export: replaced
    assert first["path"] == again["path"] and Path(again["path"], "export.json").is_file()


def test_export_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        export_command([str(tmp_path), "--public"])  # --public needs --push-to-hub
    with pytest.raises(ExportError, match="not a finished run folder"):
        export_run(tmp_path, format="adapter")
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "missing")


def test_greedy_answers_that_differ_fail_the_check_even_within_the_logit_tolerance(tiny_path, tmp_path, monkeypatch):
    """`passed` needs the greedy answers to agree too (README: both are compared), not only the logits."""
    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    _tamper_with_the_merge(monkeypatch, lambda w: w.mul_(-40))  # a badly merged adapter: the answers change
    with pytest.raises(ExportError, match="greedy answers agree on") as info:
        export_merged(backend, model, processor, RECIPE, _rows(), tmp_path / "merged", image_size=IMAGE_SIZE,
                      base_model=base, tolerance=1e9)  # no logit difference can fail this tolerance
    assert "(not on a near-tie)" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_verdict_passes_fails_or_says_not_verified_never_passed_without_a_comparison():
    from unsloth_med.export import verdict

    close = {"max_abs_logit_diff": 1e-5, "greedy_agreement": 1.0}
    assert verdict(close, 1e-4, [], strict=True, base_model="b") == {"status": "passed", "passed": True}
    tie = [{"row": 0, "first_differing_token": 2, "reference_margin": 5e-5, "near_tie": True}]
    assert verdict({**close, "greedy_agreement": 2 / 3}, 1e-4, tie, strict=True, base_model="b")["passed"] is True
    split = [{**tie[0], "reference_margin": 0.3, "near_tie": False}]
    assert verdict({**close, "greedy_agreement": 2 / 3}, 1e-4, split, strict=True, base_model="b")["status"] == "failed"
    assert verdict({**close, "max_abs_logit_diff": 1e-3}, 1e-4, [], strict=True, base_model="b")["passed"] is False
    unknown = verdict(close, 1e-4, [], strict=False, base_model="org/model-bnb-4bit")
    assert unknown["status"] == "not verified" and unknown["passed"] is None and unknown["reference"] is None
    assert "16-bit original of org/model-bnb-4bit is unknown" in unknown["reason"]


def test_not_verified_reads_the_same_in_the_cli_line_and_the_model_card():
    from unsloth_med.export import verdict, verification_summary
    from unsloth_med.hub import model_card

    check = {"max_abs_logit_diff": 0.4, "max_abs_logit": 3.0, "greedy_agreement": 1.0}
    verification = {"rows": 3, "dtype": "bfloat16", "tolerance": 0.11, **check,
                    **verdict(check, 0.11, [], strict=False, base_model="org/model-bnb-4bit")}
    line = verification_summary(verification)
    card = model_card(RECIPE, base_model="org/model-bnb-4bit", verification=verification)
    assert line.startswith("NOT VERIFIED: the 16-bit original of org/model-bnb-4bit is unknown")
    assert "**Not verified.**" in card and "16-bit original of org/model-bnb-4bit is unknown" in card
    assert "passed" not in line.lower() and "Result: passed" not in card


def test_full_fine_tune_export_says_one_thing_in_the_cli_export_json_and_model_card(tiny_path, tmp_path, capsys):
    """A full fine-tune (the demo) in float32 is no 'merged 16-bit' export: the three places say what it is."""
    backend = HFBackend()
    base = str(tiny_path("mistral3"))
    model, processor = backend.load(base, ModelArgs())  # no adapter: the weights are the model itself
    result = export_merged(backend, model, processor, RECIPE, _rows(), tmp_path / "merged", image_size=IMAGE_SIZE,
                           base_model=base, model_name="tiny:mistral3")
    printed = capsys.readouterr().out
    export = json.loads((tmp_path / "merged" / "export.json").read_text())
    card = (tmp_path / "merged" / "README.md").read_text()
    assert export["weights"] == result["weights"] == "full fine-tuned weights in float32 (no adapter to merge)"
    assert export["dtype"] == "float32" and export["method"].startswith("full fine-tune")
    assert f"Exported {export['weights']}: {tmp_path / 'merged'}" in printed
    assert f"exported as {export['weights']}" in card
    assert "16-bit" not in printed and "merged 16-bit" not in card
    assert "verification passed" in printed and "greedy answers agree on 3 of 3" in printed
    # The model as the user named it, never the local cache folder it was built in.
    assert "A fine-tune of `tiny:mistral3`" in card and base not in card


def test_export_of_a_run_credits_the_data_the_run_recorded_and_the_model_as_named(tiny_path, tmp_path):
    """A run on other data than the recipe's default (the demo's generated images): its export says so."""
    import dataclasses

    from unsloth_med.recipes import recipe_record

    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    run = _fake_run(tmp_path, model, processor, base)
    used = dataclasses.replace(RECIPE,
                               source=dataclasses.replace(RECIPE.source, id="", attribution="Generated X-rays."))
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({**recipe_record(used), "model": "tiny:mistral3",
                                                                  "base_model": base, "image_size": IMAGE_SIZE}))
    card = Path(export_run(run, format="adapter")["path"], "README.md").read_text()
    assert "Generated X-rays." in card and "Kaggle" not in card and "pkdarabi" not in card
    assert "A fine-tune of `tiny:mistral3`" in card


def test_export_waits_for_a_run_training_in_the_folder(tiny_path, tmp_path):
    """`unsloth-med export RUN` took no lock: while a `train --resume` held the folder (and was about to replace the
    adapter and set aside the exports of the one before), it exported the adapter being replaced, or one half
    written. Here a real second process holds the run's lock, as the training does for its whole run."""
    import subprocess
    import sys

    from unsloth_med.run_lock import LOCK_NAME, RunFolderBusy

    backend, model, processor, base = _tuned(tiny_path, "mistral3")
    run = _fake_run(tmp_path, model, processor, base)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from unsloth_med.run_lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} .*Export it once that run has finished"):
            export_command([str(run), "--format", "adapter"])
        assert not (run / "adapter-export").exists()
    finally:
        holder.communicate("")  # the run ends
    assert export_command([str(run), "--format", "adapter"]) == 0
    assert (run / "adapter-export" / "export.json").is_file() and not (run / LOCK_NAME).exists()
