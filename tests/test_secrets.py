"""A judge's key reaches the judge server and no file: every output of a test run is searched for it."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fteval.__main__ import main
from tests.eval.test_refusal_judges import _Judge
from tests.test_concurrent_runs import TEST

PLANTED = "sk-planted-4f1c9e0b7a2d44c1b8e3"


class _KeyedJudge(_Judge):
    keys: list = []

    def do_POST(self) -> None:
        type(self).keys.append(self.headers.get("Authorization"))
        super().do_POST()


@pytest.fixture()
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _KeyedJudge.keys, _KeyedJudge.hits, _KeyedJudge.seen, _KeyedJudge.mode = [], 0, [], "clean"
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("given", ["config", "environment"])
def test_judge_key_is_in_no_written_file(given, judge_url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    options = {"base_url": judge_url, "max_retries": 1}
    if given == "config":
        options["api_key"] = PLANTED
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    config = {**TEST, "model": {**TEST["model"], "init_args": {
        **TEST["model"]["init_args"], "behaviour": True, "behaviour_prompts_per_class": 2, "max_new_tokens": 4,
        "geval": False, "refusal_judge": "openai", "refusal_judge_options": options}}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "test.yaml").chmod(0o600)
    main(["test", "--config", "test.yaml", "--model.init_args.results_dir", "results"])

    assert _KeyedJudge.keys and set(_KeyedJudge.keys) == {f"Bearer {PLANTED}"}  # the judge got the key
    run_dir = tmp_path / "lightning_logs" / "aqi" / "version_0"
    written = [p.name for p in run_dir.iterdir()]
    assert "config.yaml" in written and "hparams.yaml" in written and any(n.startswith("events.out") for n in written)
    assert (tmp_path / "results" / "responses.jsonl").is_file() and (tmp_path / "output" / "centralized.db").is_file()
    leaked = [f for f in _files_holding(tmp_path, PLANTED) if f != "test.yaml"]
    assert leaked == []
    if given == "config":
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["model"]["init_args"]["refusal_judge_options"]["api_key"] == "<redacted>"
        assert "<redacted>" in (run_dir / "hparams.yaml").read_text()
