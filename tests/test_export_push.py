"""Pushing what a run exports: a `--hub_token` used for the push and kept out of every file, the GGUF folder
pushed with a card that fits it, and the GGUF check sizing images the way the run trained (buckets).

Real CLI runs on a tiny Mistral 3 (the hf backend, CPU) and on small generated images; nothing reaches a real
host (an unroutable endpoint, or huggingface_hub's own client with its two network calls replaced, as
tests/test_hub.py does).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from unsloth_med import secrets
from unsloth_med.cli import generic_main
from unsloth_med.cli.export import export_command
from unsloth_med.hub import files_with_secrets, push, redact, write_model_card

# Not shaped like an HF token (hf_ + 20 alphanumerics), so the shape rule of `redact` cannot hide a leak.
OPTION_TOKEN = "cli-given-token-Zq7Xw2Pk9Lm4Rt8Yv3"
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


@pytest.fixture(autouse=True)
def forget_option_secrets():
    """A token an in-process run was given is remembered for the rest of the process: not across tests."""
    yield
    secrets.forget_given_secrets()


def _images(root: Path, side: int) -> Path:
    """10 PNGs per class of side x side pixels, a CSV listing (path,label) without a split column."""
    rng = random.Random(side)
    lines = []
    for label, colour in COLOURS.items():
        for i in range(10):
            path = root / "img" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (side, side), tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)).save(path)
            lines.append(f"img/{label}/{i}.png,{label}")
    (root / "labels.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    return root / "labels.csv"


def _run_args(data: Path, out: Path) -> list[str]:
    return ["classify", "--data_dir", str(data), "--model", "tiny:mistral3", "--backend", "hf", "--max_steps", "1",
            "--image_size", "64", "--test_fraction", "0.1", "--eval_before", "false", "--eval_after", "false",
            "--output_dir", str(out)]


# ----------------------------------------------------------------------------- --hub_token
def _no_login_env(tmp_path: Path) -> dict:
    """No token anywhere but the option: no HF_TOKEN, no `hf auth login` file; the Hub endpoint unroutable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_hub_token_option_is_used_for_the_push_and_reaches_no_file(tiny_path, tmp_path):
    """`--hub_token` with no HF_TOKEN: the push gets as far as the network (it was "No Hugging Face token found"),
    and the token is in no file of the run folder (it was in checkpoint-1/training_args.bin)."""
    import torch

    tiny_path("mistral3")  # built once, outside the run
    data, run = _images(tmp_path / "data", 32), tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "unsloth_med.recipes.generic", *_run_args(data, run),
                           "--hub_token", OPTION_TOKEN, "--push_to_hub_id", "someone/x"],
                          env=_no_login_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output  # the push cannot reach the (unroutable) Hub; the run itself is complete
    assert "No Hugging Face token found" not in output
    assert "Could not reach the Hugging Face Hub" in output and "unsloth-med push" in output
    assert OPTION_TOKEN not in output
    assert json.loads((run / "run.json").read_text())["complete"] is True

    files = [p for p in run.rglob("*") if p.is_file()]
    assert run / "checkpoint-1" / "training_args.bin" in files and run / "run.log" in files
    assert (run / "adapter-export" / "README.md").is_file()  # what the push would have uploaded
    for path in files:
        assert OPTION_TOKEN.encode() not in path.read_bytes(), f"{path} holds the --hub_token value"
    args = torch.load(run / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.hub_token is None
    assert "hub_token" not in (yaml.safe_load((run / "config.yaml").read_text())["training"])


def test_the_option_token_is_the_push_token_and_a_secret_of_the_scan(tmp_path, monkeypatch):
    """The parsed options give up --hub_token; the push hands it to huggingface_hub as it would HF_TOKEN; the
    secret scan and `redact` know it, and the value of a secret option on the process's command line."""
    import huggingface_hub.constants
    from test_privacy import ENDPOINT, serve_fake_hub

    from unsloth_med.config import parse_config

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = parse_config(["--recipe", "bone_fracture", "--hub_token", OPTION_TOKEN,
                           "--output_dir", str(tmp_path / "run")])
    secrets.take_hub_token(config.training)
    assert config.training.hub_token is None and secrets.given_hub_token() == OPTION_TOKEN
    assert OPTION_TOKEN not in json.dumps(config.to_dict(), default=str)

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "export.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: other\n---\n")
    fake = serve_fake_hub(monkeypatch)  # huggingface_hub's own client, answered in this process
    assert push(folder, "someone/x") == f"{ENDPOINT}/someone/x"
    assert fake.tokens and set(fake.tokens) == {OPTION_TOKEN}  # every request to the Hub carried it
    assert set(fake.files("someone/x")) == {"export.json", "README.md"}

    (folder / "notes.txt").write_text(f"token: {OPTION_TOKEN}")
    assert files_with_secrets(folder) == ["notes.txt"]
    assert redact(f"token {OPTION_TOKEN}") == "token ***"

    # Given on this process's command line (either spelling), before any parsing: a secret too.
    secrets.forget_given_secrets()
    assert files_with_secrets(folder) == []
    other = "another-cli-token-5c8e1a9f"
    (folder / "notes.txt").write_text(f"token: {other}")
    monkeypatch.setattr(sys, "argv", ["unsloth-med", "train", f"--hub-token={other}", "--pad_token", "<pad-token>"])
    assert files_with_secrets(folder) == ["notes.txt"]
    assert secrets.command_line_secrets() == [other]  # a tokenizer's special token is no credential


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def gguf_runs(tmp_path_factory):
    """Two finished runs (the CLI, 1 step) at --image_size 64: on 96 px images (scaled down: buckets change
    nothing) and on 32 px images (bucketed: the image is padded up to the 64 px box, no longer 32 x 32)."""
    from unsloth_med.models.tiny import tiny_model_path

    tiny_model_path("mistral3")
    root = tmp_path_factory.mktemp("gguf-runs")
    runs = {}
    for side in (96, 32):
        run = root / f"run-{side}"
        assert generic_main(_run_args(_images(root / f"data-{side}", side), run)) == 0
        runs[side] = run
    return runs


@pytest.fixture(scope="module")
def gguf_tools():
    from test_gguf import PERSISTENT_BUILD

    from unsloth_med.gguf import llamacpp

    os.environ.setdefault("UNSLOTH_MED_LLAMA_CPP_DIR", str(PERSISTENT_BUILD))
    if not llamacpp._built(llamacpp.LIBRARIES) and llamacpp.missing_toolchain():
        pytest.skip(f"building llama.cpp needs {llamacpp.missing_toolchain()} (not on PATH)")
    llamacpp.ensure_built(llamacpp.LIBRARIES)
    return llamacpp.root()


@pytest.mark.slow
def test_gguf_check_sizes_images_into_the_runs_buckets(gguf_runs, gguf_tools):
    """Trained on 32 px images at --image_size 64 (bucketed): the merged export's check passed, the GGUF one
    failed with "prompt token counts differ (transformers [54, ...], llama.cpp [60, ...])"."""
    run = gguf_runs[32]
    assert export_command([str(run), "--format", "gguf"]) == 0
    merged = json.loads((run / "merged" / "export.json").read_text())
    assert merged["image_buckets"] is True and merged["verification"]["passed"]
    verification = json.loads((run / "gguf" / "export.json").read_text())["verification"]
    assert verification["passed"] and not verification["problems"]
    assert verification["prompt_tokens_hf"] == verification["prompt_tokens_llama_cpp"]
    assert verification["max_abs_logit_diff"] <= verification["tolerance"]
    info = json.loads((run / "gguf" / "unsloth_med.json").read_text())
    assert info["format"] == "gguf" and info["image_size"] == 64 and info["image_buckets"] is True


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


@pytest.mark.slow
def test_export_gguf_push_to_hub_pushes_the_gguf_folder_with_a_gguf_card(gguf_runs, gguf_tools, monkeypatch,
                                                                          capsys):
    """It crashed after the export (FileNotFoundError: RUN/gguf/unsloth_med.json) and pushed nothing."""
    from test_privacy import ENDPOINT, serve_fake_hub

    run = gguf_runs[96]
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtokenForTestsOnly0123456789abcd")
    fake = serve_fake_hub(monkeypatch)  # huggingface_hub's own client, answered in this process
    assert export_command([str(run), "--format", "gguf", "--push-to-hub", "someone/fracture-gguf"]) == 0
    assert f"Pushed to {ENDPOINT}/someone/fracture-gguf" in capsys.readouterr().out

    gguf = run / "gguf"
    result = json.loads((gguf / "export.json").read_text())
    uploaded = fake.files("someone/fracture-gguf")
    assert set(uploaded) == {p.name for p in gguf.iterdir()}  # the gguf folder, all of it
    assert {result["text_gguf"], result["mmproj_gguf"], "Modelfile", "README.md", "export.json"} <= set(uploaded)
    assert not any(name.endswith(".safetensors") for name in uploaded)  # the GGUF, not the merged weights
    assert uploaded[result["text_gguf"]] == (gguf / result["text_gguf"]).read_bytes()

    card = uploaded["README.md"].decode()
    meta = _front_matter(card)
    assert {"gguf", "llama.cpp", "medical", "classify"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "image-text-to-text" and "library_name" not in meta
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# fracture-gguf"
    assert "educational and research use only" in card  # the medical disclaimer
    assert "Classes (3): cat, dog, fox" in card and "## Training configuration" in card
    assert result["usage"]["llama-mtmd-cli"] in card and "ollama create" in card
    assert (f"hf download someone/fracture-gguf {result['text_gguf']} {result['mmproj_gguf']} Modelfile"
            in card)
    assert "from_pretrained" not in card  # no transformers snippet: these files do not load with transformers
    assert f"at most {result['verification']['max_abs_logit_diff']:.2g}" in card

    # A GGUF folder exported before GGUF exports recorded unsloth_med.json: its card comes from merged/'s record.
    # (The local card: the Hub's copy has this machine's paths shortened, tests/test_privacy.py.)
    local_card = (gguf / "README.md").read_text()
    (gguf / "unsloth_med.json").unlink()
    again = write_model_card(gguf, run_dir=run, repo_id="someone/fracture-gguf").read_text()
    assert again == local_card
