"""What leaves the user's machine when an export is pushed: only an export (never a run folder with its training
images and predictions), none of the test images' file names or this machine's paths, never into a public repo
the user did not choose, and a failed push says what the Hub holds.

The pushes go through huggingface_hub's real HfApi; its HTTP client is pointed at a fake Hub in this process
(`FakeHub`: httpx.MockTransport behind huggingface_hub.set_client_factory), so nothing reaches a host.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unsloth_med import hub, secrets
from unsloth_med.cli.export import export_command
from unsloth_med.errors import ConfigError, ExportError

FAKE_TOKEN = "hf_FAKEtokenForTestsOnly0123456789abcd"
ENDPOINT = "https://fake-hub.invalid"


class FakeHub:
    """The Hub endpoints a push uses: create a repo, its info, validate-yaml, preupload, commit (files inline)."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.tokens: list[str] = []
        self.fail_commit: int | None = None  # an HTTP status the commit answers with

    def handler(self, request):
        import httpx

        path = request.url.path
        self.requests.append((request.method, path))
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            self.tokens.append(auth[len("Bearer "):])
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body.get('organization') or 'me'}/{body['name']}"
            if repo_id in self.repos:
                return httpx.Response(409, json={"error": "You already created this model repo",
                                                 "url": f"{ENDPOINT}/{repo_id}"})
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            self.repos[repo_id] = {"private": private, "files": {}}
            return httpx.Response(200, json={"url": f"{ENDPOINT}/{repo_id}"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        parts = path.split("/")
        if path.startswith("/api/models/") and len(parts) >= 5:
            repo_id = "/".join(parts[3:5])
            if repo_id not in self.repos:
                return httpx.Response(404, json={"error": "Repository not found"},
                                      headers={"X-Error-Code": "RepoNotFound"})
            if len(parts) > 5 and parts[5] == "preupload":
                files = json.loads(request.content)["files"]
                return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
            if len(parts) > 5 and parts[5] == "commit":
                if self.fail_commit:
                    return httpx.Response(self.fail_commit, json={"error": "Your push was rejected because it "
                                                                           "contains files larger than 10 MiB."})
                for line in request.content.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        self.repos[repo_id]["files"][item["value"]["path"]] = base64.b64decode(
                            item["value"]["content"])
                oid = "a" * 40
                return httpx.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{oid}",
                                                 "commitOid": oid})
            return httpx.Response(200, json={"id": repo_id, "private": self.repos[repo_id]["private"],
                                             "sha": "b" * 40})
        return httpx.Response(404, json={"error": "not on the fake Hub"})

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id]["files"]


def serve_fake_hub(monkeypatch) -> FakeHub:
    """A FakeHub behind huggingface_hub's own HTTP client for this test (HF_ENDPOINT set, offline mode off); the
    client that was there comes back at teardown. tests/test_hub.py and tests/test_export_push.py use it too."""
    import httpx
    import huggingface_hub.constants
    from huggingface_hub.utils import _http

    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", ENDPOINT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)  # the shared client is made again, from the factory below
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY",
                        lambda: httpx.Client(transport=httpx.MockTransport(fake.handler)))
    return fake


@pytest.fixture
def fake_hub(monkeypatch):
    """A FakeHub, and HF_TOKEN set."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    yield serve_fake_hub(monkeypatch)
    secrets.forget_given_secrets()


def _export_folder(root: Path) -> Path:
    folder = root / "merged"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "export.json").write_text(json.dumps({"format": "merged-16bit", "verification": {"passed": True}}))
    (folder / "README.md").write_text("---\nlicense: other\n---\n")
    return folder


# ----------------------------------------------------------------------------- what may be pushed
def test_a_run_folder_is_not_pushed(tmp_path, fake_hub):
    """`unsloth-med push RUN_DIR` uploaded the whole run: samples.png (training images), eval_after.json (the test
    predictions with image paths), run.log, config.yaml (the data folder) and the checkpoints."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({"recipe": "classify"}))
    (run / "run.json").write_text(json.dumps({"complete": True}))
    Image.new("RGB", (32, 32)).save(run / "samples.png")
    (run / "eval_after.json").write_text(json.dumps({"predictions": [
        {"id": "img/fracture/PATIENT-MRN1000.png", "prediction": "fracture"}]}))
    with pytest.raises(ExportError, match="no export.json.*run folder.*samples.png.*unsloth-med export"):
        hub.push(run, "someone/x")
    assert fake_hub.requests == [] and fake_hub.repos == {}


def test_the_hub_gets_no_test_image_names_and_no_local_paths(tiny_path, tmp_path, fake_hub, caplog):
    """A real merged export of a tiny Mistral 3, checked on test images whose file names hold patient ids, trained
    on data under the user's folder: export.json named the images (verification.row_ids), unsloth_med.json and
    the card the data folder and the base model's absolute paths. The local records keep them; the Hub does not."""
    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import LoraArgs, ModelArgs
    from unsloth_med.export import export_merged
    from unsloth_med.export import verify as export_verify
    from unsloth_med.recipes.base import DataSource, Recipe

    base = str(tiny_path("mistral3"))
    data = tmp_path / "home" / "alice" / "ward-7-scans"
    recipe = Recipe(name="classify", task="classification", labels=("fracture", "normal"),  # as `classify DIR` makes
                    instruction="Classify this image: fracture or normal. Reply with the class name only.",
                    source=DataSource(kind="auto", id=str(data), attribution=f"Your own data ({data}): state its "
                                                                             "source, license and credit here."),
                    default_model=base)
    rows = []
    for i in range(2):
        image = Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3)).astype("uint8"))
        rows.append({"image": image, "target": recipe.labels[i], "id": f"img/{recipe.labels[i]}/PATIENT-MRN10{i}.png"})
    backend = HFBackend()
    torch.set_num_threads(1)
    model, processor = backend.load(base, ModelArgs())
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_verify, "MAX_VERIFY_NEW_TOKENS", 2)
        export_merged(backend, model, processor, recipe, rows, tmp_path / "run" / "merged", image_size=64,
                      base_model=base, run_dir=tmp_path / "run", model_name=base)
    folder = tmp_path / "run" / "merged"
    local = (folder / "export.json").read_text()
    assert "PATIENT-MRN100" in local and str(data) in (folder / "unsloth_med.json").read_text()  # kept locally

    with caplog.at_level(logging.INFO, logger="unsloth_med.hub"):
        hub.push(folder, "someone/fracture")
    pushed = fake_hub.files("someone/fracture")
    assert set(pushed) == {p.name for p in folder.iterdir()}  # every file of the export, nothing else
    for name, content in pushed.items():
        assert b"PATIENT-MRN" not in content, f"{name} names a test image"
        assert str(tmp_path).encode() not in content, f"{name} holds a path of this machine"
    assert pushed["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    record = json.loads(pushed["export.json"])
    assert "row_ids" not in record["verification"] and record["verification"]["passed"] is True
    info = json.loads(pushed["unsloth_med.json"])
    assert info["data_source"]["id"] == "ward-7-scans" and info["labels"] == ["fracture", "normal"]
    assert "Source: `ward-7-scans`" in pushed["README.md"].decode()
    assert "without the file names of the test images" in caplog.text


def test_the_home_folder_is_not_pushed(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "alice"))
    folder = _export_folder(tmp_path)
    (folder / "README.md").write_text(f"Trained on {tmp_path}/home/alice/scans; not {tmp_path}/home/alice2.\n")
    hub.push(folder, "someone/x")
    assert fake_hub.files("someone/x")["README.md"].decode() == f"Trained on ~/scans; not {tmp_path}/home/alice2.\n"


# ----------------------------------------------------------------------------- where it goes
def test_a_private_push_never_lands_in_an_existing_public_repo(tmp_path, fake_hub, caplog):
    """create_repo(exist_ok=True, private=True) leaves an existing public repo public: the push uploaded the model
    there and logged "(private)"."""
    folder = _export_folder(tmp_path)
    fake_hub.repos["someone/public"] = {"private": False, "files": {}}
    with pytest.raises(ExportError, match="exists and is PUBLIC.*nothing was uploaded.*--public"):
        hub.push(folder, "someone/public")
    assert fake_hub.files("someone/public") == {}

    assert hub.push(folder, "someone/public", private=False) == f"{ENDPOINT}/someone/public"  # chosen: published
    assert "README.md" in fake_hub.files("someone/public")

    fake_hub.repos["someone/private"] = {"private": True, "files": {}}
    with caplog.at_level(logging.INFO, logger="unsloth_med.hub"):
        hub.push(folder, "someone/private", private=False)
    assert "stays private" in caplog.text and "(private)" in caplog.text

    hub.push(folder, "someone/new")
    assert fake_hub.repos["someone/new"]["private"] is True and set(fake_hub.files("someone/new")) == {
        "config.json", "export.json", "README.md"}
    assert set(fake_hub.tokens) == {FAKE_TOKEN}


@pytest.mark.parametrize("repo_id", ["someone/bad..name", "someone/a--b", "someone/" + "x" * 97, "someone/m.git"])
def test_a_repo_id_the_hub_refuses_is_a_clear_error_before_any_work(repo_id, tmp_path, fake_hub):
    """They passed the OWNER/NAME check and failed inside huggingface_hub (HFValidationError traceback); with
    `export --push-to-hub` only after the whole export."""
    folder = _export_folder(tmp_path)
    with pytest.raises(ConfigError, match="not a valid Hub repo id.*OWNER/NAME"):
        hub.push(folder, repo_id)
    with pytest.raises(ConfigError, match="not a valid Hub repo id"):
        export_command([str(tmp_path / "no-run-yet"), "--push-to-hub", repo_id])
    assert fake_hub.requests == []


def test_a_failed_commit_says_nothing_was_committed_and_how_to_push_again(tmp_path, fake_hub):
    folder = _export_folder(tmp_path)
    fake_hub.fail_commit = 400
    with pytest.raises(ExportError) as info:
        hub.push(folder, "someone/x")
    message = str(info.value)
    assert "Upload to someone/x failed" in message and "no file of this push was committed" in message
    assert f"unsloth-med push {folder} someone/x" in message and FAKE_TOKEN not in message
    assert fake_hub.files("someone/x") == {}  # the repo was made; it holds nothing of this push


def test_a_tokenizer_goes_up_as_it_is_while_the_records_lose_the_paths(tmp_path, fake_hub, monkeypatch):
    """Every text file of the export had this machine's paths replaced, tokenizer.json too: with HOME=/root (Colab,
    Kaggle, Docker) and data in /data, a vocabulary's "/root" and "/data" tokens became "~" and "data", and the
    Hub's tokenizer gave other ids than the model was trained with (its "~" token now "/root"'s id). A path inside
    another one (/mnt/data) was cut too."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    monkeypatch.setenv("HOME", "/root")
    folder = _export_folder(tmp_path)
    vocab = {"[UNK]": 0, "~": 1, "/root": 2, "/data": 3, "data": 4, "cd": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "unsloth_med.json").write_text(json.dumps({"data_source": {"id": "/data", "kind": "auto"}}))
    (folder / "README.md").write_text("Source: `/data` (auto), mounted from /mnt/data; cache in /root/.cache.\n")

    hub.push(folder, "someone/x")
    pushed = fake_hub.files("someone/x")
    assert pushed["tokenizer.json"] == (folder / "tokenizer.json").read_bytes()
    assert Tokenizer.from_str(pushed["tokenizer.json"].decode()).encode("cd /root /data ~").ids == [5, 2, 3, 1]
    assert pushed["README.md"].decode() == "Source: `data` (auto), mounted from /mnt/data; cache in ~/.cache.\n"
    assert json.loads(pushed["unsloth_med.json"])["data_source"]["id"] == "data"
