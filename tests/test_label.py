"""`rlhf label`: the rankings file, the server's guards, the CLI's sampling, and the page in a
real browser (Debian's chromium + chromium-driver through selenium; skipped, naming what is
missing, where they are absent).

The server runs as the real CLI in a subprocess. Most tests hand it a samples file written
beforehand (answers taken from reward_data's rankings), so nothing is sampled; one test
samples with the tiny random model through the CLI.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf.cli import main

pytest.importorskip("starlette", reason="starlette is not installed (pip install 'rlhf[label]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'rlhf[label]')")

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny.yaml"
POLICY = "fake-policy"  # the model named in pre-written samples files: never loaded
SCRIPT = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'


# ------------------------------------------------------------------------------ helpers


def shipped_rankings(n: int) -> list[dict]:
    lines = (REPO / "reward_data/rankings/test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def write_fixture(tmp: Path, n: int = 6, script_at: int | None = None) -> tuple[Path, Path]:
    """A prompts file and the samples file `rlhf label` would have written for it (k=4)."""
    rows = shipped_rankings(n)
    if script_at is not None:
        rows[script_at]["responses"][2] = SCRIPT
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    out = tmp / "rankings.jsonl"
    samples = [
        {"prompt": r["prompt"], "responses": r["responses"], "finished": [True] * 4}
        | {"k": 4, "model": POLICY}
        for r in rows
    ]
    (tmp / "rankings.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return prompts, out


class Server:
    """`rlhf label` in a subprocess on a free port; `url` is the page's URL with its token."""

    def __init__(self, tmp: Path, prompts: Path, out: Path, *extra: str):
        cmd = [sys.executable, "-m", "rlhf.cli", "label", RECIPE, f"output_dir={tmp}/run"]
        cmd += ["--prompts", str(prompts), "--out", str(out), "--port", "0", *extra]
        if "--model" not in extra:
            cmd += ["--model", POLICY, "--annotator", "tester"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()
        self.base, self.token = self.url.split("/?token=")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=120)
            except queue.Empty:
                self.stop()
                raise AssertionError("no URL from rlhf label:\n" + "".join(self.log)) from None
            self.log.append(line)
            found = re.search(r"open (http://\S+)", line)
            if found:
                return found.group(1)

    def request(self, path: str, body: dict | None = None, token: str | None = "") -> tuple:
        """(status, JSON or text) of a request; token "" sends the right one, None none."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Token"] = token or self.token
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["label", RECIPE, *args])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------- bad input


def test_k_below_two_is_refused(tmp_path, capsys):
    prompts, out = write_fixture(tmp_path)
    code, err = run_cli(capsys, "--prompts", str(prompts), "--out", str(out), "--k", "1")
    assert code == 2
    assert err.strip() == "error: --k must be at least 2 (answers to rank per prompt), got 1"


def test_unreadable_prompt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_text("Say hi\n")
    code, err = run_cli(capsys, "--prompts", str(bad), "--out", str(tmp_path / "r.jsonl"))
    assert code == 2
    assert err.count("\n") == 1 and "prompts.txt: unsupported data file type" in err


def test_out_that_is_not_a_rankings_file_is_refused(tmp_path, capsys):
    prompts, out = write_fixture(tmp_path)
    out.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    code, err = run_cli(capsys, "--prompts", str(prompts), "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: --out is not a rankings file: ") and "rankings.jsonl:1" in err


# --------------------------------------------------------------- the rankings file


def test_rows_are_rankings_the_reward_loader_reads(tmp_path):
    """Rows the queue writes (extra keys included) load as they are, through the recipe's
    reward.train.path, with the ranking intact."""
    from rlhf import data
    from rlhf.recipe import load_recipe
    from rlhf.tools.label.samples import Item
    from rlhf.tools.label.store import Queue, RankingsFile

    src = shipped_rankings(3)
    items = [Item([{"role": "user", "content": r["prompt"]}], r["responses"]) for r in src]
    out = tmp_path / "rankings.jsonl"
    q = Queue(items, RankingsFile(out), "ann")
    for i, ranking in enumerate(([3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0])):
        assert q.rank(i, ranking, all_bad=i == 1, seconds=2.34)
    assert not q.rank(0, [0, 1, 2, 3], all_bad=False, seconds=1)  # a prompt is written once
    recipe = load_recipe(
        RECIPE, [f"reward.train.path={out}", "reward.eval=null", "reward.eval_fraction=0"]
    )
    train, _ = data.load_train_eval(recipe, "reward", "comparisons")
    assert [r.ranking for r in train] == [[3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]]
    assert [r.responses for r in train] == [r["responses"] for r in src]
    rows = rows_of(out)
    assert [r["all_bad"] for r in rows] == [False, True, False]
    assert {r["annotator"] for r in rows} == {"ann"} and rows[0]["seconds"] == 2.3
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["time"]) for r in rows)


def test_concurrent_appends_lose_no_row_and_write_no_prompt_twice(tmp_path):
    """16 threads, two per prompt, rank 8 prompts at once, through two RankingsFile objects on
    the same file (as two servers would): 8 whole rows, one per prompt."""
    from rlhf.tools.label.samples import Item
    from rlhf.tools.label.store import Queue, RankingsFile

    items = [Item([{"role": "user", "content": f"p{i}"}], ["a" * 500, "b"]) for i in range(8)]
    out = tmp_path / "rankings.jsonl"
    queues = [Queue(items, RankingsFile(out), f"tab{t}") for t in range(2)]
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def rank(q: Queue, i: int) -> None:
        barrier.wait()
        results.append(q.rank(i, [1, 0], all_bad=False, seconds=1))

    threads = [threading.Thread(target=rank, args=(q, i)) for i in range(8) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = rows_of(out)
    assert sorted(r["prompt"] for r in rows) == [f"p{i}" for i in range(8)]
    assert sorted(results) == [False] * 8 + [True] * 8


def test_two_tabs_get_different_prompts_and_a_prompt_is_ranked_once(tmp_path):
    """Over HTTP: two tabs are handed different prompts; when both rank the same one, the
    second gets 409 and the file holds it once. Requests without the token get 403."""
    prompts, out = write_fixture(tmp_path, n=3)
    server = Server(tmp_path, prompts, out)
    try:
        assert server.request("/api/next?tab=a", token=None)[0] == 403
        assert server.request("/api/next?tab=a", token="wrong")[0] == 403
        assert server.request("/", token=None)[0] == 403
        _, a = server.request("/api/next?tab=a")
        _, b = server.request("/api/next?tab=b")
        assert (a["item"]["id"], b["item"]["id"]) == (0, 1)
        assert a["progress"] == {"ranked": 0, "skipped": 0, "left": 3}
        body = {"id": 0, "ranking": [0, 1, 2, 3], "seconds": 1}
        assert server.request("/api/rank", body)[0] == 200
        status, reply = server.request("/api/rank", {**body, "ranking": [3, 2, 1, 0]})
        assert status == 409 and reply["progress"]["ranked"] == 1
        assert server.request("/api/rank", {**body, "id": 1, "ranking": [0, 0, 1, 2]})[0] == 400
    finally:
        server.stop()
    assert [r["ranking"] for r in rows_of(out)] == [[0, 1, 2, 3]]


def test_cli_samples_once_with_the_tiny_model(tmp_path, tiny_model_dir):
    """The real CLI samples k distinct answers per prompt with the tiny model into the samples
    file, serves them, and on a restart reuses the file instead of sampling again."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n"Count to three"\n{"prompt": "Say hi"}\n')
    out = tmp_path / "rankings.jsonl"
    args = ("--model", tiny_model_dir, "--k", "3")
    server = Server(tmp_path, prompts, out, *args)
    try:
        _, state = server.request("/api/next?tab=a")
        assert state["progress"] == {"ranked": 0, "skipped": 0, "left": 2}
        ranked = {"id": state["item"]["id"], "ranking": [2, 0, 1], "seconds": 3}
        assert server.request("/api/rank", ranked)[0] == 200
    finally:
        server.stop()
    assert any("sampled 6 answers" in line for line in server.log)
    samples = (tmp_path / "rankings.samples.jsonl").read_text()
    rows = [json.loads(line) for line in samples.splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi", "Count to three"]
    assert all(len(set(r["responses"])) == 3 and r["k"] == 3 for r in rows)
    again = Server(tmp_path, prompts, out, *args)
    try:
        assert again.request("/api/next?tab=a")[1]["progress"]["left"] == 1
    finally:
        again.stop()
    assert not any("sampled" in line for line in again.log)
    assert (tmp_path / "rankings.samples.jsonl").read_text() == samples
    assert rows_of(out)[0]["responses"] == rows[0]["responses"]


# ------------------------------------------------------------------ in a real browser


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, or a skip naming the missing package."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if not driver:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    return browser, driver


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,860",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless system Chromium driven by its own chromedriver: nothing is downloaded."""
    binary, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_item(driver, item: int | str) -> None:
    """Until the page shows item `item` ("" once nothing is left)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-item") == str(item)
    )


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def cards(driver, zone: str) -> list[int]:
    return [
        int(c.get_attribute("data-id"))
        for c in driver.find_elements("css selector", f"#{zone} .card")
    ]


def progress(driver) -> tuple[int, int, int]:
    return tuple(
        int(driver.find_element("id", f"n-{n}").text) for n in ("ranked", "skipped", "left")
    )


def drag(driver, card: int, target_css: str, dy: float) -> None:
    """Drag answer `card` onto the element at `target_css`, `dy` of its height below its middle."""
    from selenium.webdriver.common.action_chains import ActionChains

    source = driver.find_element("css selector", f'.card[data-id="{card}"]')
    target = driver.find_element("css selector", target_css)
    offset = int(dy * target.size["height"])
    chain = ActionChains(driver).click_and_hold(source).move_by_offset(12, 12)
    chain.move_to_element_with_offset(target, 0, offset).release().perform()


def rank_by_keyboard(driver) -> None:
    """Items 0-2 by keys, with an undo of a pick, a skip and its undo, and the all-bad flag."""
    from selenium.webdriver.common.keys import Keys

    wait_item(driver, 0)
    press(driver, "3", Keys.BACKSPACE, "2", "4", "1")
    assert cards(driver, "ranked") == [1, 3, 0] and cards(driver, "pool") == [2]
    assert "goes last" in driver.find_element("css selector", "#pool .card").text
    press(driver, Keys.ENTER)
    wait_item(driver, 1)
    press(driver, "s")
    wait_item(driver, 2)
    assert progress(driver) == (1, 1, 4)
    press(driver, Keys.BACKSPACE)  # undoes the skip
    wait_item(driver, 1)
    press(driver, "1", "2", "3", "b", Keys.ENTER)
    wait_item(driver, 2)
    press(driver, "4", "3", "2", Keys.ENTER)
    wait_item(driver, 3)


def rank_by_dragging(driver) -> None:
    """Item 3: answer 3 into the empty ranking, answer 1 below it, answer 4 above both."""
    drag(driver, 2, "#ranked", 0)
    drag(driver, 0, "#ranked", 0.45)
    assert cards(driver, "ranked") == [2, 0]
    drag(driver, 3, '#ranked .card[data-id="2"]', -0.4)
    assert cards(driver, "ranked") == [3, 2, 0]
    if os.environ.get("RLHF_LABEL_SCREENSHOT"):  # docs/label.png
        driver.save_screenshot(os.environ["RLHF_LABEL_SCREENSHOT"])
    driver.find_element("id", "save").click()
    wait_item(driver, 4)


def test_a_person_ranks_in_the_browser_and_resumes_after_a_restart(tmp_path, browser):
    prompts, out = write_fixture(tmp_path, n=6, script_at=4)
    server = Server(tmp_path, prompts, out)
    try:
        browser.get(server.base + "/")  # no token
        assert "403" in browser.find_element("tag name", "body").text
        browser.get(server.url)
        rank_by_keyboard(browser)
        rank_by_dragging(browser)
        # Item 4 holds an answer with <script>: shown as text, never run.
        assert SCRIPT in browser.find_element("css selector", '#pool .card[data-id="2"]').text
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements("css selector", "#pool script, #pool img")
        press(browser, "s")
        wait_item(browser, 5)
        assert progress(browser) == (4, 1, 1)
    finally:
        server.stop()
    rows = rows_of(out)
    expected = shipped_rankings(4)
    assert [r["prompt"] for r in rows] == [e["prompt"] for e in expected]
    assert [r["responses"] for r in rows] == [e["responses"] for e in expected]
    assert [r["ranking"] for r in rows] == [[1, 3, 0, 2], [0, 1, 2, 3], [3, 2, 1, 0], [3, 2, 0, 1]]
    assert [r["all_bad"] for r in rows] == [False, True, False, False]
    assert {r["annotator"] for r in rows} == {"tester"}
    again = Server(tmp_path, prompts, out)
    try:
        browser.get(again.url)
        wait_item(browser, 4)  # the first prompt not ranked; skips last one session
        assert progress(browser) == (4, 0, 2)
    finally:
        again.stop()
