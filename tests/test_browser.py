"""The pages flame-kd prints, opened in a real browser (Debian's Chromium driven by Playwright) on a real
`mlflow server`: the run, its experiment's runs and its model open in MLflow's Model training workflow,
the run page shows the test figures without a search, and the runs list shows them as columns."""

from __future__ import annotations

import re
import shutil
import uuid

import numpy as np
import pytest

from flame_kd import pages, tracking

pytestmark = pytest.mark.slow  # a real server, a logged model and a browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 120_000  # a first page load on a busy 2-core machine takes tens of seconds


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright; the test skips, saying what is missing, where either is absent
    (`.ci/run` installs Chromium with apt-get, the test extras install Playwright)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def printed(mlflow_server, tmp_path_factory):
    """One finished run with the figures a distill run logs and a logged student, on the server; the
    URLs flame-kd printed when it ended ("View run", "View experiment", "View model")."""
    import contextlib
    import io

    from flame_kd.models import build_student
    from flame_kd.models.deploy import Deployable

    from mlflow.tracking._tracking_service import utils

    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("browser"))
    mp.setattr(utils, "_tracking_uri", utils._tracking_uri)  # the next module's tests start where they would
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    tracking.configure(mlflow_server.url)
    metrics = {f"split_{k}": 0.5 for k in ("frac_train", "frac_val", "frac_test", "gap", "frames")}
    metrics |= {f"split_nn_similarity_{k}": 0.9 for k in range(15)}  # the 20 figures the table starts with
    metrics |= {"test_f1_macro": 0.8765, "test_ap_macro": 0.9123, "test_f1_macro_constant": 0.5,
                "val_best_f1_macro": 0.8899, "best_epoch": 2.0}
    example = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with tracking.run(f"browser-{uuid.uuid4().hex[:6]}", "student kl_bce", {"flame_kd.stage": "distill"}) as run:
            for epoch in (1, 2):
                tracking.log_metrics({"train/loss": 1.0 / epoch, "val/f1_macro": 0.8 + epoch / 100}, step=epoch)
            tracking.log_metrics(metrics)
            tracking.describe_headline(metrics)
            tracking.log_model(Deployable(build_student("timm:test_efficientnet", image_size=32)), example,
                               name=pages.model_name("student", "timm:test_efficientnet"))
    urls = dict(re.findall(r"View (run|experiment|model)\b.*? at: (\S+)", out.getvalue()))
    yield urls, run.info.run_id
    mp.undo()


def _open(browser, url: str, wait_for: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.get_by_text(wait_for).first.wait_for(timeout=WAIT_MS)
    return page


def _in_model_training(page) -> bool:
    """MLflow 3's side bar: Model training lists the model registry, GenAI its judges."""
    page.get_by_text("Model registry").or_(page.get_by_text("Judges")).first.wait_for(timeout=WAIT_MS)
    return page.get_by_text("Model registry").first.is_visible() and not page.get_by_text("Judges").first.is_visible()


def test_printed_urls_carry_the_model_training_workflow(printed):
    urls, run_id = printed
    assert set(urls) == {"run", "experiment", "model"}, urls
    assert all(pages.WORKFLOW_QUERY in u for u in urls.values())
    assert f"/runs/{run_id}?" in urls["run"] and f"viewStateShareKey={pages.HEADLINE_VIEW}" in urls["experiment"]


def test_run_page_opens_in_model_training_with_the_test_figures_in_view(browser, printed):
    urls, _ = printed
    page = _open(browser, urls["run"], pages.HEADLINE_PREFIX)
    assert _in_model_training(page)
    headline = page.get_by_text(pages.HEADLINE_PREFIX).first
    box = headline.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 1000, "the headline is below the first screen"
    text = headline.inner_text()
    assert "test_f1_macro 0.8765" in text and "test_ap_macro 0.9123" in text and "val_best_f1_macro 0.8899" in text
    page.close()
    plain = _open(browser, urls["run"].split("?")[0], "Model training")  # the link MLflow itself prints
    assert not _in_model_training(plain), "without workflowType a fresh browser opens GenAI: the check would pass vacuously"
    plain.close()


def test_runs_list_shows_the_headline_metrics_as_columns(browser, printed):
    urls, _ = printed
    page = _open(browser, urls["experiment"], "student kl_bce")
    assert _in_model_training(page)
    page.get_by_test_id("sort-header-test_f1_macro").first.wait_for(state="attached", timeout=WAIT_MS)
    headers = page.get_by_role("columnheader").all_inner_texts()
    assert {"test_f1_macro", "test_ap_macro", "val_best_f1_macro"} <= set(headers), headers
    page.close()


def test_model_page_opens_in_model_training_under_its_name(browser, printed):
    urls, _ = printed
    page = _open(browser, urls["model"], "student-timm-test_efficientnet")
    assert _in_model_training(page)
    page.close()
