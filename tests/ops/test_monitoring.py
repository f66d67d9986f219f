"""Alert rules and the scrape config check with promtool; the alerts behave as intended (promtool test rules); and a real
Prometheus on 127.0.0.1 scraping a running 2-rank training answers every dashboard query with values."""
from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.ops.helpers import CONFIG, launcher, start, stop, trainer_overrides, wait_for
from tests.s3_server import free_port

MONITORING = Path(__file__).resolve().parents[2] / "launcher/monitoring"
DASHBOARD = MONITORING / "dashboard.json"
ALERTS = MONITORING / "alerts.yml"
RULES = ALERTS.read_text().count("- alert: ")  # the rules as written, counted without a YAML parser
NOT_INSTALLED = "Debian's prometheus is not installed: apt-get install prometheus (.ci/run does); a required dev tool, never skipped"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, NOT_INSTALLED
    return path


def test_alert_rules_load_and_fire_as_intended() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0 and f"SUCCESS: {RULES} rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=MONITORING)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_kubernetes_scrape_config_checks(tmp_path: Path) -> None:
    """Debian builds Prometheus without Kubernetes service discovery, so the check swaps that one block for a static
    target; the relabelling and the rule file are checked as written."""
    text = (MONITORING / "prometheus-scrape.yml").read_text()
    sd = "    kubernetes_sd_configs:\n      - role: pod\n"
    assert sd in text
    copy = tmp_path / "prometheus.yml"
    static = "    static_configs:\n      - targets: ['127.0.0.1:9480']\n"
    copy.write_text(text.replace(sd, static).replace("  - alerts.yml", f"  - {ALERTS}"))
    done = subprocess.run([promtool(), "check", "config", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_exporter_series_and_labels() -> None:
    """Rank 0 serves the job-level series, every rank its own per-rank ones; loss keys of both shapes get labels;
    accelerator memory is only set where the record has it (None on CPU); checkpoint histograms, the termination grace
    and eval losses are job level."""
    from echomotion.metrics import PrometheusExporter

    rec = {"step": 7, "loss": 1.5, "loss/motion": 1.2, "loss/video": 1.7, "loss/t2m/motion": 1.1, "loss/m2v/video": 1.8,
           "grad_norm": 0.9, "lr": 1e-4, "samples": 4, "tokens": 1800, "step_time": 0.2, "data_wait": 0.01,
           "nan_streak": 2, "memory_bytes": None, "mfu": None, "compute_s": 0.15, "memory_reserved_bytes": None,
           "memory_total_bytes": None}
    rank0, rank1 = (PrometheusExporter(two_free_ports(), 0, "127.0.0.1", termination_grace=360),
                    PrometheusExporter(two_free_ports(), 1, "127.0.0.1", termination_grace=360))
    rank0.observe_step(rec, job_level=True)
    rank0.observe_step({**rec, "step": 8, "data_wait": 0.3}, job_level=True)
    rank1.observe_step({**rec, "compute_s": 0.18, "memory_reserved_bytes": 6e9, "memory_total_bytes": 8e10}, job_level=False)
    for exporter in (rank0, rank1):  # every rank saves; only rank 0 serves the result
        exporter.observe_checkpoint(42.0, blocked_s=3.0)
        exporter.observe_checkpoint(0.3, blocked_s=0.3)
        exporter.observe_eval({"step": 7, "eval/loss/t2m/motion": 0.8, "eval/loss/joint/video": 0.9, "eval/samples": 16})
    samples = {r: {(s.name, tuple(sorted(s.labels.items()))): s.value for m in e.registry.collect() for s in m.samples}
               for r, e in ((0, rank0), (1, rank1))}
    loss = {labels: v for (name, labels), v in samples[0].items() if name == "echomotion_loss"}
    assert loss == {(("modality", "all"), ("task", "all")): 1.5, (("modality", "motion"), ("task", "all")): 1.2,
                    (("modality", "video"), ("task", "all")): 1.7, (("modality", "motion"), ("task", "t2m")): 1.1,
                    (("modality", "video"), ("task", "m2v")): 1.8}
    assert samples[0][("echomotion_nan_streak", ())] == 2 and samples[0][("echomotion_mfu_ratio", ())] == 0
    # counters of everything consumed, for rate(); no per-second gauges
    assert samples[0][("echomotion_samples_total", ())] == 8 and samples[0][("echomotion_tokens_total", ())] == 3600
    assert not any("per_second" in name for name, _ in samples[0])
    wait = [samples[0][(f"echomotion_data_wait_seconds_{k}", (("rank", "0"),))] for k in ("count", "sum")]  # a histogram
    assert wait == [2, pytest.approx(0.31)]
    for r in (0, 1):
        assert samples[r][("echomotion_memory_max_allocated_bytes", (("rank", str(r)),))] > 0  # peak RSS on CPU
        assert samples[r][("echomotion_step_time_seconds_count", (("rank", str(r)),))] == 2 - r
        assert samples[r][("echomotion_process_resident_memory_bytes", ())] > 0
    assert samples[0][("echomotion_rank_compute_seconds", (("rank", "0"),))] == 0.15
    assert samples[1][("echomotion_rank_compute_seconds", (("rank", "1"),))] == 0.18
    assert not {"echomotion_memory_reserved_bytes", "echomotion_memory_total_bytes"} & {name for name, _ in samples[0]}
    assert samples[1][("echomotion_memory_reserved_bytes", (("rank", "1"),))] == 6e9
    assert samples[1][("echomotion_memory_total_bytes", (("rank", "1"),))] == 8e10

    assert samples[0][("echomotion_termination_grace_seconds", ())] == 360
    assert samples[0][("echomotion_checkpoint_save_seconds", ())] == 0.3  # the gauge holds the last save
    for name, total in (("echomotion_checkpoint_duration_seconds", 42.3), ("echomotion_checkpoint_blocked_seconds", 3.3)):
        assert samples[0][(f"{name}_count", ())] == 2 and samples[0][(f"{name}_sum", ())] == pytest.approx(total)
        buckets = {float(dict(labels)["le"]): v for (n, labels), v in samples[0].items() if n == f"{name}_bucket"}
        assert min(buckets) == 0.1 and max(b for b in buckets if math.isfinite(b)) == 1800  # 0.1 s .. 30 min
        assert buckets[0.5] == 1 and buckets[60] == 2
    eval_loss = {labels: v for (name, labels), v in samples[0].items() if name == "echomotion_eval_loss"}
    assert eval_loss == {(("modality", "motion"), ("task", "t2m")): 0.8, (("modality", "video"), ("task", "joint")): 0.9}
    job_level = {"echomotion_step", "echomotion_loss", "echomotion_samples_total", "echomotion_tokens_total", "echomotion_restarts_total", "echomotion_checkpoint_save_seconds",
                 "echomotion_checkpoint_duration_seconds_count", "echomotion_checkpoint_blocked_seconds_count",
                 "echomotion_termination_grace_seconds", "echomotion_eval_loss"}
    assert job_level <= {name for name, _ in samples[0]}
    assert not job_level & {name for name, _ in samples[1]}


# Dashboard queries that a 2-rank CPU training (no evaluation, no resume) cannot answer, keyed by (panel or annotation,
# series), with the reason. The running-training test requires each of them to be valid PromQL and empty, so an entry
# that starts answering (say, once the trainer evaluates) fails there and must move out of this list.
EMPTY_ON_CPU = {
    ("Eval loss by task and modality", "echomotion_eval_loss"): "the trainer runs no evaluation in this branch",
    ("Memory by rank", "echomotion_memory_reserved_bytes"): "the CUDA caching allocator's reserve: None on CPU",
    ("Memory by rank", "echomotion_memory_total_bytes"): "the accelerator's total memory: None on CPU",
    ("annotation Restarts", "echomotion_restarts_total"): "marks a resume; this run never resumes",
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title or 'annotation <name>', PromQL) for every panel target and annotation, with the dashboard's
    variables filled in as Grafana would."""
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    sources = [(panel["title"], target) for panel in board["panels"] for target in panel.get("targets", [])]
    sources += [(f"annotation {a['name']}", a) for a in board["annotations"]["list"]]
    out = []
    for where, source in sources:
        assert source["datasource"]["uid"] == "${datasource}", where
        out.append((where, source["expr"].replace("$job", ".*").replace("$__rate_interval", "20s")))
    assert out
    return out


def expected_empty(where: str, expr: str) -> bool:
    return any(where == place and re.search(rf"\b{series}\b", expr) for place, series in EMPTY_ON_CPU)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def has_values(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(math.isfinite(float(r["value"][1])) for r in result)


def two_free_ports() -> int:
    """A port p with p + 1 also free: ranks 0 and 1 serve port + local rank."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("found no two consecutive free ports")


def test_prometheus_scrapes_a_running_training(humove: Path, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus is not None, NOT_INSTALLED
    metrics = two_free_ports()
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        "  - job_name: echomotion-test\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics}', '127.0.0.1:{metrics + 1}']}}]\n"
    )
    prom_log = tmp_path / "prometheus.log"
    with prom_log.open("w") as fh:
        prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                                stdout=fh, stderr=subprocess.STDOUT)
    run = tmp_path / "run"
    train_log = tmp_path / "train.log"
    train = start(launcher("torchrun", "--run", "--config", CONFIG, "--nproc-per-node", "2", "--accelerator", "cpu",
                           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "ops-prometheus",
                           *trainer_overrides(humove, run, "train.steps=100000", "train.checkpoint_every=5",
                                              f"train.metrics_port={metrics}", "train.metrics_addr=127.0.0.1",
                                              "train.peak_flops=1e12")),  # a peak makes MFU defined on CPU
                  train_log)
    base = f"http://127.0.0.1:{web}"
    try:
        queries = dashboard_queries()
        empty = {expr for where, expr in queries if expected_empty(where, expr)}
        assert len(empty) == len(EMPTY_ON_CPU)  # each entry names one query of the dashboard
        pending = {expr for _, expr in queries} - empty

        def answered() -> bool:
            pending.difference_update({e for e in list(pending) if has_values(query(base, e))})
            return not pending

        wait_for(lambda: _ready(base), [prom, train], [prom_log], 60, "prometheus to be ready")
        wait_for(answered, [prom, train], [train_log, prom_log], 180, lambda: f"values for every dashboard query (missing: {pending})")
        assert {e: query(base, e) for e in empty} == {e: [] for e in empty}  # valid PromQL, no values (EMPTY_ON_CPU)
        assert {r["metric"]["rank"] for r in query(base, "echomotion_step_time_seconds_count")} == {"0", "1"}
        assert len(query(base, "echomotion_step")) == 1  # job-level series come from rank 0 only
        groups = json.load(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10))["data"]["groups"]
        assert [len(g["rules"]) for g in groups] == [RULES]  # the alert rules load into a running Prometheus
    finally:
        stop(train)
        prom.terminate()
        prom.wait(timeout=30)
    out = train_log.read_text()
    assert re.search(r"SIGTERM: saved step (\d+)", out), out[-4000:]  # launcher -> torchrun -> trainer: checkpoint on SIGTERM


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_progress_in_a_log_file_is_a_plain_line_every_n_steps() -> None:
    """Where stdout is not a terminal (Slurm, Kubernetes), rank 0 prints one line every `every` steps and at the last,
    with that step's numbers, instead of a bar's carriage returns; a resumed run counts its rate from where it resumed."""
    import io

    from echomotion.metrics import ProgressReport

    out = io.StringIO()
    report = ProgressReport("phase 2", total=250, initial=40, every=100, stream=out)
    for step in range(41, 251):
        report.update({"step": step, "loss": 1.0 / step, "lr": 2e-3, "samples_per_s": 8.0})
    report.close()
    lines = out.getvalue().splitlines()
    assert [re.search(r"phase 2 step (\d+)/250 ", line)[1] for line in lines] == ["100", "200", "250"]
    assert "\r" not in out.getvalue()
    assert "loss 0.0100 lr 0.002 8.00 samples/s" in lines[0]
    assert re.search(r"eta \d+:\d\d:\d\d$", lines[0]) and lines[-1].endswith("eta 0:00:00")
