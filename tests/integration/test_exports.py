"""Exports from the API and the CLI, checked by their consumers: every format loads with Hugging
Face `datasets`; the chat file passes OpenAI's data checks; alpaca and sharegpt rows are what
LLaMA-Factory aligns; TRL's DPO and SFT trainers train a step on the dpo and chat files. The
selection, the split, gzip, the manifest and "the same selection gives the same bytes"."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from service.domain.export_formats import validation_target
from tests.consumers.instruction_formats import alpaca_problems, sharegpt_problems
from tests.consumers.openai_chat import MAX_TOKENS_PER_EXAMPLE, format_errors
from tests.integration.export_stack import ExportStack, export_stack

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DISTILL = str(Path(sys.executable).parent / "distill")


@pytest.fixture(scope="module")
def st() -> Iterator[ExportStack]:
    with export_stack() as stack:
        yield stack


def _lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines()]


def _save(tmp_path: Path, name: str, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


def _load(path: Path, cache: Path) -> Any:
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


EXPECTED_COLUMNS = {
    ("pgkd", "jsonl"): {"text", "label"},
    ("rationales", "jsonl"): {"text", "label", "rationale"},
    ("pgkd", "chat"): {"messages"},
    ("pgkd", "alpaca"): {"instruction", "input", "output"},
    ("pgkd", "sharegpt"): {"conversations"},
    ("rationales", "dpo"): {"prompt", "chosen", "rejected"},
    ("arte", "dpo"): {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"},
    ("pgkd", "lineage"): {
        "text",
        "label",
        "kind",
        "status",
        "rejection_reason",
        "rejection_detail",
        "example_id",
        "iteration",
        "source_row_id",
        "cause",
        "teacher_call",
    },
}


@pytest.mark.parametrize(("strategy", "fmt"), sorted(EXPECTED_COLUMNS))
def test_every_format_loads_with_hugging_face_datasets(
    st: ExportStack, strategy: str, fmt: str, tmp_path: Path
) -> None:
    body = st.body(strategy, format=fmt, iteration="all")
    path = _save(tmp_path, f"{fmt}.jsonl", body)
    data = _load(path, tmp_path / "hf")
    assert set(data.column_names) == EXPECTED_COLUMNS[(strategy, fmt)]
    assert data.num_rows == body.count(b"\n") > 0
    if fmt == "chat":
        assert [m["role"] for m in data[0]["messages"]] == ["system", "user", "assistant"]
    if fmt == "dpo":
        assert data[0]["chosen"][0]["role"] == "assistant"
        assert data[0]["prompt"][-1]["role"] in ("user", "system")


def test_the_chat_files_pass_openais_data_checks(st: ExportStack, tmp_path: Path) -> None:
    for strategy in ("pgkd", "rationales", "arte"):
        path = _save(tmp_path, f"{strategy}.jsonl", st.body(strategy, format="chat"))
        errors, examples, largest = format_errors(path)
        assert not errors, (strategy, errors)
        assert examples >= 10 and 0 < largest <= MAX_TOKENS_PER_EXAMPLE
    # A rationale is written into the assistant turn by the documented template.
    rows = _lines(st.body("rationales", format="chat", kinds="rationale"))
    assert rows
    for row in rows:
        answer = row["messages"][2]["content"]
        reasoning, _, label = answer.rpartition("\n#### ")
        assert reasoning and label in {
            "card_lost",
            "balance",
            "transfer",
            "loan",
            "fraud",
            "address_change",
        }


def test_alpaca_and_sharegpt_rows_are_what_llama_factory_aligns(
    st: ExportStack, tmp_path: Path
) -> None:
    for strategy in ("pgkd", "rationales"):
        alpaca = _save(tmp_path, f"{strategy}-alpaca.jsonl", st.body(strategy, format="alpaca"))
        sharegpt = _save(tmp_path, f"{strategy}-sg.jsonl", st.body(strategy, format="sharegpt"))
        assert alpaca_problems(alpaca) == []
        assert sharegpt_problems(sharegpt) == []
        # The same rows in the same order as the task's own fields.
        plain = _lines(st.body(strategy, format="jsonl"))
        assert [r["input"] for r in _lines(alpaca.read_bytes())] == [r["text"] for r in plain]


def test_trl_trains_a_step_on_the_dpo_and_chat_files(st: ExportStack, tmp_path: Path) -> None:
    outcome = _save(tmp_path, "outcome-dpo.jsonl", st.body("rationales", format="dpo"))
    arte = _save(tmp_path, "arte-dpo.jsonl", st.body("arte", format="dpo"))
    chat = _save(tmp_path, "chat.jsonl", st.body("rationales", format="chat"))
    assert outcome.read_bytes() and arte.read_bytes()
    for pair in _lines(outcome.read_bytes()):  # an accepted and a rejected answer to one input
        assert pair["prompt"][1]["role"] == "user"
        assert pair["chosen"] != pair["rejected"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.consumers.trl_train",
            f"dpo={outcome}",
            f"dpo={arte}",
            f"sft={chat}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    reports = [json.loads(x) for x in run.stdout.splitlines() if x.startswith('{"kind"')]
    assert run.returncode == 0 and len(reports) == 3, run.stdout[-3000:] + run.stderr[-3000:]
    for report in reports:
        assert report["loss"] is not None and report["rows"] > 0, report
    assert {"prompt", "chosen", "rejected"} <= set(reports[0]["columns"])
    assert reports[2]["columns"] == ["messages"]


def _label_counts(body: bytes) -> Counter[str]:
    return Counter(r["label"] for r in _lines(body))


def test_the_split_is_stratified_deterministic_and_complete(st: ExportStack) -> None:
    params = {"format": "jsonl", "validation_fraction": 0.25, "iteration": "all"}
    whole = st.body("pgkd", format="jsonl", iteration="all")
    train = st.body("pgkd", split="train", **params)
    validation = st.body("pgkd", split="validation", **params)
    assert sorted(train.splitlines() + validation.splitlines()) == sorted(whole.splitlines())
    per_label = _label_counts(whole)
    assert _label_counts(validation) == Counter(
        {label: validation_target(n, 0.25) for label, n in per_label.items()}
    )
    # The same selection gives the same bytes; another seed another (equally sized) split.
    assert st.body("pgkd", split="validation", **params) == validation
    reseeded = st.body("pgkd", split="validation", split_seed=7, **params)
    assert reseeded != validation and _label_counts(reseeded) == _label_counts(validation)
    # Both files keep the export's order.
    order = {line: n for n, line in enumerate(whole.splitlines())}
    assert [order[x] for x in validation.splitlines()] == sorted(
        order[x] for x in validation.splitlines()
    )


def test_dpo_pairs_of_one_prompt_stay_in_one_split(st: ExportStack) -> None:
    params = {"format": "dpo", "validation_fraction": 0.5, "iteration": "all"}
    train = _lines(st.body("rationales", split="train", **params))
    validation = _lines(st.body("rationales", split="validation", **params))
    prompts = {json.dumps(p["prompt"]) for p in train}
    assert not prompts & {json.dumps(p["prompt"]) for p in validation}
    assert len(train) + len(validation) == len(_lines(st.body("rationales", format="dpo")))


def test_the_selection_narrows_the_rows(st: ExportStack) -> None:
    lineage = _lines(st.body("pgkd", format="lineage", iteration="all"))
    seeds = [r for r in lineage if r["kind"] == "seed"]
    generated = [r for r in lineage if r["kind"] != "seed"]
    assert seeds and generated
    assert {r["iteration"] for r in generated} <= {1, 2}
    only_seed = _lines(st.body("pgkd", format="lineage", kinds="seed"))
    assert [r["text"] for r in only_seed] == [r["text"] for r in seeds]
    as_of_0 = _lines(st.body("pgkd", format="lineage", iteration=0))
    assert {r["kind"] for r in as_of_0} == {"seed"}
    as_of_1 = _lines(st.body("pgkd", format="lineage", iteration=1))
    assert {r["iteration"] for r in as_of_1 if r["iteration"] is not None} == {1}
    fraud = _lines(st.body("pgkd", format="jsonl", labels=["fraud", "loan"], iteration="all"))
    assert fraud and {r["label"] for r in fraud} == {"fraud", "loan"}
    kinds = _lines(
        st.body("pgkd", format="lineage", kinds=["hard_negative", "augmented"], iteration="all")
    )
    assert kinds and {r["kind"] for r in kinds} == {"augmented", "hard_negative"}
    # Rejected rows, with their reasons, only in the lineage format.
    everything = _lines(st.body("rationales", format="lineage", status="all", iteration="all"))
    rejected = [r for r in everything if r["status"] == "rejected"]
    assert rejected and all(r["rejection_reason"] == "answer_mismatch" for r in rejected)
    only_rejected = _lines(st.body("rationales", format="lineage", status="rejected"))
    assert only_rejected and {r["status"] for r in only_rejected} == {"rejected"}


def test_lineage_names_the_cause_and_the_teacher_call(st: ExportStack) -> None:
    rows = _lines(st.body("rationales", format="lineage", iteration="all"))
    seed = next(r for r in rows if r["kind"] == "seed")
    assert seed["source_row_id"] and seed["teacher_call"] is None and seed["iteration"] is None
    generated = [r for r in rows if r["kind"] == "rationale"]
    assert generated
    for row in generated:
        assert row["cause"]["reason"] and row["cause"]["seed_row"]["text"] == row["text"]
        assert row["cause"]["student"]["iteration"] == row["iteration"] - 1
        call = row["teacher_call"]
        assert call["model"] == "fake-teacher" and call["tokens_in"] > 0
        assert call["template"].startswith("rationale")


def test_bad_requests_are_422s_naming_the_field(st: ExportStack) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("pgkd", {"format": "csv"}, "format"),
        ("pgkd", {"format": "dpo"}, "format"),
        ("pgkd", {"kinds": "seeds"}, "kinds"),
        ("pgkd", {"kinds": "preference_pair"}, "kinds"),
        ("pgkd", {"labels": "not-a-label"}, "labels"),
        ("pgkd", {"status": "rejected"}, "status"),
        ("pgkd", {"status": "maybe"}, "status"),
        ("pgkd", {"iteration": 99}, "iteration"),
        ("pgkd", {"iteration": "latest"}, "iteration"),
        ("pgkd", {"iteration": -1}, "iteration"),
        ("pgkd", {"validation_fraction": 0.9}, "validation_fraction"),
        ("pgkd", {"validation_fraction": 0.2}, "split"),
        ("pgkd", {"split": "validation"}, "split"),
        ("pgkd", {"gzip": "perhaps"}, "gzip"),
        ("pgkd", {"colour": "blue"}, "colour"),
    ]
    for strategy, params, field in cases:
        resp = st.stream(strategy, **params)
        assert resp.status_code == 422, (params, resp.text)
        error = resp.json()["error"]
        assert {"code", "message", "details"} <= set(error)
        assert any(field in d["field"] for d in error["details"]), (params, error)
    post = st.client.post(
        f"/v1/jobs/{st.jobs['pgkd']}/exports",
        json={"format": "jsonl", "validation_fraction": 2},
        headers=st.auth,
    )
    assert post.status_code == 422 and "validation_fraction" in post.text


def test_gzip_is_the_same_lines_and_the_same_bytes_each_time(st: ExportStack) -> None:
    plain = st.body("pgkd", format="chat")
    first = st.stream("pgkd", format="chat", gzip="true")
    assert first.headers["content-type"] == "application/gzip"
    assert first.headers["content-disposition"].endswith('-chat.jsonl.gz"')
    assert gzip.decompress(first.content) == plain
    assert st.body("pgkd", format="chat", gzip="true") == first.content


def _wait_export(st: ExportStack, export_id: str) -> dict[str, Any]:
    st.sender.run_until_idle()
    done: dict[str, Any] = st.client.get(f"/v1/exports/{export_id}", headers=st.auth).json()
    assert done["status"] == "succeeded", done
    return done


def test_a_written_export_has_two_files_and_a_manifest(st: ExportStack) -> None:
    selection = {"format": "chat", "validation_fraction": 0.2, "iteration": "all", "gzip": True}
    resp = st.client.post(f"/v1/jobs/{st.jobs['pgkd']}/exports", json=selection, headers=st.auth)
    assert resp.status_code == 202, resp.text
    done = _wait_export(st, resp.json()["id"])
    manifest = done["manifest"]
    downloads = {}
    for split in ("train", "validation"):
        got = st.client.get(
            f"/v1/exports/{done['id']}/download", params={"split": split}, headers=st.auth
        )
        assert got.status_code == 200 and got.headers["content-type"] == "application/gzip"
        entry = manifest["files"][split]
        assert hashlib.sha256(got.content).hexdigest() == entry["sha256"]
        assert len(gzip.decompress(got.content).splitlines()) == entry["rows"]
        downloads[split] = got.content
        # The streamed file of the same selection is the same bytes.
        params = {k: v for k, v in selection.items() if k != "gzip"}
        assert st.body("pgkd", split=split, gzip="true", **params) == got.content
    assert (
        manifest["rows"] == done["row_count"] == sum(f["rows"] for f in manifest["files"].values())
    )
    counts = manifest["counts"]
    assert sum(counts["kind"].values()) == sum(counts["label"].values()) == manifest["rows"]
    assert sum(counts["iteration"].values()) == manifest["rows"]
    assert set(counts["iteration"]) == {"0", "1", "2"} and counts["kind"]["seed"] == 48
    job = st.client.get(f"/v1/jobs/{st.jobs['pgkd']}", headers=st.auth).json()
    iterations = st.client.get(f"/v1/jobs/{st.jobs['pgkd']}/iterations", headers=st.auth).json()
    assert manifest["teacher_models"] == ["fake-teacher"]
    assert manifest["spec_hash"] and len(manifest["spec_hash"]) == 64
    student = manifest["student"]
    assert student["iteration"] == job["best_iteration"] == 2
    assert student["metric"] == iterations[-1]["metric"] and student["metric_name"] == "accuracy"
    assert manifest["selection"]["validation_fraction"] == 0.2
    assert datetime.fromisoformat(manifest["created_at"])
    # A file that is not there is a 422, not a 500.
    plain = st.client.post(f"/v1/jobs/{st.jobs['pgkd']}/exports", json={}, headers=st.auth)
    plain_done = _wait_export(st, plain.json()["id"])
    missing = st.client.get(
        f"/v1/exports/{plain_done['id']}/download",
        params={"split": "validation"},
        headers=st.auth,
    )
    assert missing.status_code == 422 and missing.json()["error"]["details"][0]["field"] == "split"
    assert set(plain_done["manifest"]["files"]) == {"train"}


def test_a_job_scoped_key_streams_its_own_jobs_export(st: ExportStack) -> None:
    resp = st.client.post("/v1/keys", json={"job_id": st.jobs["pgkd"]}, headers=st.auth)
    assert resp.status_code == 201, resp.text
    scoped = {"Authorization": f"Bearer {resp.json()['key']}"}
    own = st.client.get(f"/v1/jobs/{st.jobs['pgkd']}/export", headers=scoped)
    assert own.status_code == 200 and own.content == st.body("pgkd")
    other = st.client.get(f"/v1/jobs/{st.jobs['arte']}/export", headers=scoped)
    assert other.status_code == 404


def _cli(st: ExportStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.pop("REDIS_URL", None)
    env.update(DATABASE_URL=st.url, DISTILL_LOG_LEVEL="WARNING", COLUMNS="200")
    return subprocess.run(
        [DISTILL, "export", *args, "--tenant", "exports"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_distill_export_writes_the_files_and_a_manifest(st: ExportStack, tmp_path: Path) -> None:
    job = st.jobs["rationales"]
    args = ["--format", "alpaca", "--validation-fraction", "0.2", "--iteration", "all"]
    run = _cli(st, job, "--out", str(tmp_path / "a"), *args)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for split in ("train", "validation"):
        data = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][split]["sha256"]
        assert data == st.body(
            "rationales",
            format="alpaca",
            validation_fraction=0.2,
            iteration="all",
            split=split,
        )
        assert f"{split}.jsonl" in run.stdout
    # Hugging Face reads the directory as a train and a validation split.
    from datasets import load_dataset

    both = load_dataset("json", data_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "hf"))
    assert set(both) == {"train", "validation"}
    assert both["validation"].num_rows == manifest["files"]["validation"]["rows"] > 0
    # Again: the same bytes.
    again = _cli(st, job, "--out", str(tmp_path / "b"), *args)
    assert again.returncode == 0, again.stderr
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lineage = _lines(st.body("rationales", format="lineage", iteration="all"))
    assert manifest["counts"]["kind"] == dict(Counter(r["kind"] for r in lineage))
    # A bad option is a one-line error naming it, exit 2.
    bad = _cli(st, job, "--out", str(tmp_path / "c"), "--iteration", "latest")
    assert bad.returncode == 2 and "--iteration" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(st, job, "--out", str(tmp_path / "c"), "--format", "dpo", "--kind", "seed")
    assert bad.returncode == 2 and "kinds" in bad.stderr
    assert not (tmp_path / "c").exists()
