"""The chat page and the status page, driven in headless Chromium against the real stack.

The browser talks to a real ``chatai gateway`` whose worker runs the tiny model on vLLM's CPU
engine: what the test sees is what a user of the page sees. The Markdown renderer's escaping
and the pages' headers are checked without a broker (fast tier).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import SERVED_MODEL
from support.browser import chromium

STATIC = Path(__file__).resolve().parents[1] / "gateway" / "web" / "static"
WAIT = 120  # seconds a page may take to show what the test waits for (a busy 2-core machine)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _until(driver, condition, what: str, timeout: float = WAIT):
    # The pages re-render lists (the model list follows the workers' heartbeats): an element found
    # a moment ago may be gone; the condition is then simply tried again.
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, message=f"waiting for {what}")


# ---------------------------------------------------------------- fast tier: no broker


def test_markdown_is_rendered_and_nothing_in_it_runs(browser, tmp_path: Path):
    """Model output is text: tags, attributes and javascript: links come out escaped, inert."""
    page = tmp_path / "md.html"
    page.write_text(f'<!doctype html><meta charset="utf-8"><script src="{(STATIC / "markdown.js").as_uri()}"></script>'
                    '<div id="out"></div>')
    browser.get(page.as_uri())
    hostile = ("# Title\n**bold** and *it* and `<b>code</b>`\n\n- one\n- two\n\n"
               "<img src=x onerror=\"window.pwned=1\"> <script>window.pwned=1</script>\n"
               "[click](javascript:window.pwned=1) [ok](https://example.org/a?b=\"c\")\n"
               "```\n<svg onload=window.pwned=1>\n```\n")
    browser.execute_script("document.getElementById('out').innerHTML = renderMarkdown(arguments[0]);", hostile)
    out = browser.find_element(By.ID, "out")
    assert browser.execute_script("return window.pwned === undefined")
    tags = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('#out *')).map(e => e.tagName.toLowerCase())"))
    assert tags <= {"h1", "p", "strong", "em", "code", "ul", "li", "br", "a", "pre"}, tags
    assert out.find_element(By.TAG_NAME, "h1").text == "Title"
    assert out.find_element(By.TAG_NAME, "strong").text == "bold"
    assert "<b>code</b>" in out.find_element(By.TAG_NAME, "code").text  # shown, not applied
    assert "<img src=x" in out.text and "<script>" in out.text
    links = out.find_elements(By.TAG_NAME, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/a?b=%22c%22"]  # no javascript: link; the quote stays inside the URL
    assert "<svg onload" in out.find_element(By.TAG_NAME, "pre").text


def test_pages_are_served_with_a_strict_content_security_policy():
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    client = TestClient(create_app(GatewaySettings(broker_direct=True)))  # no lifespan: no broker needed
    for path, marker in (("/", 'id="messages"'), ("/status", 'id="workers"'), ("/web/chat.js", "renderMarkdown")):
        r = client.get(path)
        assert r.status_code == 200 and marker in r.text, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/web/../settings.py").status_code == 404
    assert client.get("/web/nothing.js").status_code == 404


# ---------------------------------------------------------------- against the running stack


def _open_chat(browser, gateway, max_tokens: int) -> None:
    browser.get(gateway.base_url + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(gateway.base_url + "/")
    browser.find_element(By.ID, "api-key").send_keys(gateway.api_key)
    browser.find_element(By.ID, "connect").click()
    _until(browser, lambda d: SERVED_MODEL in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")],
           "the served model in the model list")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "max-tokens").send_keys(str(max_tokens))
    # The tiny random model may pick its end token at any step; vLLM's ignore_eos keeps it going.
    browser.find_element(By.ID, "extra-params").send_keys('{"ignore_eos": true}')
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # closed; the values stay


# Records the answer's length at every change of the page (each network read is rendered once).
RECORD_LENGTHS = """
window.lengths = [];
new MutationObserver(() => {
  const el = document.querySelector('#messages .message.assistant:last-child .content');
  if (el) window.lengths.push(el.textContent.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""

# Hands the page the chat stream's real bytes one server-sent event per network read. How many
# events one read brings is the machine's timing: a tiny model on an idle CPU can finish its 200
# tokens before a busy browser reads once, and the page then rightly renders once (a clean run
# saw exactly that). What the test asks of the page is that it renders each read as it comes;
# that the gateway streams rather than buffers is shown by the SDK reading the first chunks
# of a long answer and hanging up before it ends (test_stream_disconnect_aborts_generation).
ONE_EVENT_PER_READ = """
const realFetch = window.fetch;
window.fetch = async (resource, init) => {
  const response = await realFetch(resource, init);
  if (!String(resource).endsWith('/v1/chat/completions') || !response.ok) return response;
  const reader = response.body.getReader();
  const decoder = new TextDecoder(), encoder = new TextEncoder();
  const events = [];
  let buffer = '', ended = false;
  const body = new ReadableStream({
    async pull(controller) {
      while (!events.length && !ended) {
        const { value, done } = await reader.read();
        if (done) { ended = true; if (buffer) events.push(buffer); break; }
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf('\\n\\n')) >= 0) {
          events.push(buffer.slice(0, cut + 2));
          buffer = buffer.slice(cut + 2);
        }
      }
      if (!events.length) { controller.close(); return; }
      await new Promise(resolve => setTimeout(resolve, 0));  // a task apart, as network reads are
      controller.enqueue(encoder.encode(events.shift()));
    },
  }, { highWaterMark: 0 });
  return new Response(body, { status: response.status, headers: response.headers });
};
"""


def _conversations(browser) -> list[dict]:
    return json.loads(browser.execute_script("return localStorage.getItem('chatai.conversations')") or "[]")


def test_chat_page_streams_an_answer_in_pieces(browser, gateway, tmp_path: Path):
    _open_chat(browser, gateway, max_tokens=200)
    browser.execute_script(RECORD_LENGTHS)
    browser.execute_script(ONE_EVENT_PER_READ)
    browser.find_element(By.ID, "prompt").send_keys("Tell me about the cluster.")
    browser.find_element(By.ID, "send").click()
    _until(browser, lambda d: d.find_element(By.ID, "chat-status").text in ("Done.",) or "Error" in d.find_element(By.ID, "chat-status").text,
           "the answer to finish")
    assert browser.find_element(By.ID, "chat-status").text == "Done."
    answer = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant .content").text
    assert answer.strip()
    growing = sorted({n for n in browser.execute_script("return window.lengths") if n > 0})
    assert len(growing) >= 3, f"the answer appeared at once, not in pieces: lengths {growing}"
    browser.save_screenshot(str(tmp_path / "chat.png"))
    # The conversation lives in the browser: both messages, the answer as streamed.
    [conv] = _conversations(browser)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == "Tell me about the cluster."
    assert conv["messages"][1]["content"].strip() and not conv["messages"][1].get("stopped")


def _cancellations(gateway) -> float:
    text = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    m = re.search(rf'^chatai_cancellations_total\{{model="{SERVED_MODEL}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_stop_button_ends_the_generation(browser, gateway):
    """Stop, pressed as soon as the first words show, aborts the request: the page keeps the part
    it got, marks it stopped, and the gateway cancels the generation on the worker."""
    before = _cancellations(gateway)
    _open_chat(browser, gateway, max_tokens=400)
    browser.execute_script("""
      new MutationObserver(() => {
        const el = document.querySelector('#messages .message.assistant:last-child .content');
        if (el && el.textContent.length && !window.stopClicked) {
          window.stopClicked = true;
          document.getElementById('stop').click();
        }
      }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    browser.find_element(By.ID, "prompt").send_keys("Write a long story.")
    browser.find_element(By.ID, "send").click()
    _until(browser, lambda d: d.find_element(By.ID, "chat-status").text not in ("", "Generating…")
           and "model(s)" not in d.find_element(By.ID, "chat-status").text, "the stream to end")
    assert browser.find_element(By.ID, "chat-status").text == "Stopped."
    message = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant")
    assert "stopped" in message.get_attribute("class") and "Stopped." in message.text
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")
    [conv] = _conversations(browser)
    kept = conv["messages"][1]
    assert kept["stopped"] is True and kept["content"].strip()
    # The gateway saw the client go and told the worker to abort (chatai_cancellations_total).
    _until(browser, lambda d: _cancellations(gateway) > before, "the gateway to count the cancellation", timeout=30)


def test_status_page_shows_the_live_worker(browser, gateway, served_worker):
    r = httpx.get(gateway.base_url + "/api/status", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # internals need a key
    assert httpx.get(gateway.base_url + "/api/status", headers={"Authorization": "Bearer sk-wrong-key-12345678"},
                     timeout=10).status_code == 401

    browser.get(gateway.base_url + "/status")
    browser.execute_script("sessionStorage.clear();")  # the chat tests left their key for this tab
    browser.get(gateway.base_url + "/status")
    browser.find_element(By.ID, "api-key").send_keys(gateway.api_key)
    browser.find_element(By.ID, "connect").click()
    row = _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#workers tr[data-model="{SERVED_MODEL}"]'),
                 "the served worker's row")[0]
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == SERVED_MODEL and cells[2] == "ready" and cells[5].endswith("/ 16")
    # Where the worker runs is for the operator (the metrics token), not for API keys.
    assert cells[0] == cells[3] == "–" and served_worker.worker_id not in browser.page_source
    model_row = browser.find_element(By.CSS_SELECTOR, f'#models tr[data-model="{SERVED_MODEL}"]')
    m = [td.text for td in model_row.find_elements(By.TAG_NAME, "td")]
    assert m[1] == "1" and m[4] == "16"  # one ready worker, its capacity
    assert m[6].isdigit() and m[7].isdigit() and int(m[7]) >= 1  # the queue, with the worker consuming
    assert browser.find_element(By.ID, "broker-state").text == "connected"
    assert "direct" in browser.find_element(By.ID, "tunnel-state").text  # this gateway has no tunnel
    # It refreshes by itself.
    first = browser.find_element(By.ID, "updated").text
    assert first.startswith("updated ")
    _until(browser, lambda d: d.find_element(By.ID, "updated").text not in (first, ""), "a refresh", timeout=30)
    assert browser.find_element(By.ID, "updated").text.startswith("updated ")
