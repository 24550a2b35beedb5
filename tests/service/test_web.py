"""The web page at `/`, in a real browser (headless Chromium driven by Selenium) against the real
stack: paste a key, submit, watch progress and previews, see the gallery, list and cancel jobs,
errors in words, and a phone-sized window without sideways scrolling.

Needs Debian's chromium and chromium-driver (`python3 dev.py test` installs them when it runs as
root with apt, as CI does); skipped with that reason elsewhere."""

from __future__ import annotations

import io
import shutil

import httpx
import pytest
from PIL import Image

from tests.service.conftest import KEY_A

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (dev.py installs them as root)"
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, f"timed out waiting for {what}")


def _open(driver, stack, key: str = KEY_A) -> None:
    """Load the page and paste the key; the models and the job list load."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(stack.base_url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(stack.base_url + "/")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    if key == KEY_A:
        _wait(driver, lambda d: Select(d.find_element(By.ID, "model")).options, 30, "the models")


def _submit_until_the_gallery_shows(driver, count: int, width: int) -> str:
    """Click Generate, wait for the job to succeed and its `count` images (each `width` pixels
    wide) to load in the gallery; the job's id."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "submit").click()
    job_id = _wait(driver, lambda d: d.find_element(By.ID, "job-id").text, 30, "the job id")
    _wait(driver, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 120, "the job to succeed")
    images = _wait(
        driver,
        lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#gallery img')];"
            f"return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth === {width}) && imgs.length"
        ),
        60,
        f"{count} images in the gallery",
    )
    assert images == count
    return job_id


def _fill(driver, **fields: str) -> None:
    from selenium.webdriver.common.by import By

    for element_id, value in fields.items():
        element = driver.find_element(By.ID, element_id.replace("_", "-"))
        element.clear()
        element.send_keys(value)


def test_the_page_is_served_with_its_assets_and_a_strict_policy(stack):
    page = httpx.get(stack.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/ui/app.js">' in page.text and "https://" not in page.text  # no CDN
    script = httpx.get(stack.base_url + "/ui/app.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(stack.base_url + "/ui/..%2Fapp.py", timeout=10).status_code == 404
    assert httpx.get(stack.base_url + "/ui/index.html", timeout=10).status_code == 404


@needs_browser
def test_submit_watch_and_see_the_gallery(browser, stack):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, stack)
    models = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in models.options] == ["faces", "mnist"]  # as /v1/models lists them
    assert models.first_selected_option.get_attribute("value") == "mnist"  # the default model is chosen
    Select(browser.find_element(By.ID, "class-label")).select_by_visible_text("7")
    _fill(browser, num_images="4", steps="60", seed="11")
    Select(browser.find_element(By.ID, "sampler")).select_by_value("dpmpp_2m")
    job_id = _submit_until_the_gallery_shows(browser, 4, 28)
    # progress advanced on the way: several progress events, ending at the last step
    assert int(browser.execute_script("return document.body.dataset.progressEvents || 0")) >= 2
    # previews of the first image arrived while it ran (the gallery has replaced the last one);
    # each is a data: PNG of the model's 28×28 size
    previews = browser.execute_script(
        "const p = document.getElementById('preview');"
        "return [Number(document.body.dataset.previews || 0), p.src.slice(0, 22), p.naturalWidth]"
    )
    assert previews[0] >= 1 and previews[1:] == ["data:image/png;base64,", 28]
    assert browser.find_element(By.ID, "step-text").text == "60 / 60"
    assert browser.find_element(By.ID, "image-text").text == "4 / 4"
    row = f"tr[data-job-id='{job_id}']"  # the list refreshes itself when the job ends
    _wait(browser, lambda d: "succeeded" in "".join(r.text for r in d.find_elements(By.CSS_SELECTOR, row)), 30)
    assert not browser.find_elements(By.CSS_SELECTOR, f"{row} button.cancel-job")  # nothing to cancel
    with stack.client() as api:  # the page's job is the API's job, with the parameters chosen
        params = api.get(f"/v1/jobs/{job_id}").json()["params"]
    chosen = (params["num_images"], params["steps"], params["sampler"], params["seed"], params["class_label"])
    assert chosen == (4, 60, "dpmpp_2m", 11, 7)
    assert params["guidance_scale"] == 3.0  # the page's default: inside the model's interval (docs/quality.md)


@needs_browser
def test_a_latent_rgb_model_is_chosen_watched_and_shown(browser, stack):
    """`faces`, the stack's tiny latent model (16x16 RGB, unconditional): the page offers no
    class and no guidance for it, and shows its decoded previews and images at their size."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, stack)
    models = Select(browser.find_element(By.ID, "model"))
    models.select_by_value("faces")
    assert models.first_selected_option.text == "faces (16×16)"
    classes = browser.find_element(By.ID, "class-label")
    assert not classes.is_enabled() and Select(classes).options == []  # no classes to choose from
    assert not browser.find_element(By.ID, "guidance").is_enabled()  # nor a class to steer towards
    assert browser.find_element(By.ID, "steps").get_attribute("max") == "1000"  # its schedule's length
    _fill(browser, num_images="2", steps="60", seed="21")
    Select(browser.find_element(By.ID, "sampler")).select_by_value("ddim")
    Select(browser.find_element(By.ID, "output-format")).select_by_value("webp")
    job_id = _submit_until_the_gallery_shows(browser, 2, 16)
    # previews of the first image, decoded from its latents: data: PNGs of the model's 16x16 size
    previews = browser.execute_script(
        "const p = document.getElementById('preview');"
        "return [Number(document.body.dataset.previews || 0), p.src.slice(0, 22), p.naturalWidth, p.naturalHeight]"
    )
    assert previews[0] >= 1 and previews[1:] == ["data:image/png;base64,", 16, 16]
    assert browser.find_element(By.ID, "step-text").text == "60 / 60"
    assert browser.find_element(By.ID, "image-text").text == "2 / 2"
    # each gallery image is the stored image: its link saves it under its own name and format
    links = browser.execute_script(
        "return [...document.querySelectorAll('#gallery a')].map(a => [a.download, a.querySelector('img').src])"
    )
    assert [name for name, _ in links] == ["00000.webp", "00001.webp"]
    pixels = []
    for _, src in links:
        got = httpx.get(src, timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(got.content)) as im:
            assert (im.format, im.size, im.mode) == ("WEBP", (16, 16), "RGB")
            pixels.append(im.tobytes())
    assert pixels[0] != pixels[1]
    with stack.client() as api:  # the page's job is the API's job: no class, no guidance
        params = api.get(f"/v1/jobs/{job_id}").json()["params"]
    chosen = (params["model"], params["num_images"], params["steps"], params["sampler"], params["seed"])
    assert chosen == ("faces", 2, 60, "ddim", 21)
    assert (params["class_label"], params["guidance_scale"], params["output_format"]) == (None, 1.0, "webp")
    assert params["previews"] is True


@needs_browser
def test_a_running_job_is_canceled_from_the_list(browser, stack):
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    _fill(browser, num_images="8", steps="900")
    browser.find_element(By.ID, "previews").click()  # off
    browser.find_element(By.ID, "submit").click()
    job_id = _wait(browser, lambda d: d.find_element(By.ID, "job-id").text, 30, "the job id")
    button = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}'] button.cancel-job"), 30
    )
    button[0].click()
    _wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "canceled", 60, "the job to be canceled")
    assert not browser.find_element(By.ID, "preview-box").is_displayed()  # previews were not asked for
    with stack.client() as api:
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


@needs_browser
def test_errors_are_shown_in_words(browser, stack):
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    _fill(browser, steps="5000")
    browser.find_element(By.ID, "submit").click()
    error = _wait(browser, lambda d: d.find_element(By.ID, "error").text, 30, "the error")
    assert "steps" in error and "HTTP 422" in error

    _open(browser, stack, key="not-a-key")
    error = _wait(browser, lambda d: d.find_element(By.ID, "error").text, 30, "the error")
    assert "HTTP 401" in error


@needs_browser
def test_readable_on_a_phone(browser, stack):
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr"), 30, "the job list")  # its widest part
    # a phone's viewport (headless windows are never narrower than 500 px, so emulate the device)
    phone = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
    try:
        width, scroll_width = browser.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert width == 390
        assert scroll_width <= width, f"{scroll_width - width} px of sideways scrolling"
        submit = browser.find_element(By.ID, "submit")
        assert submit.is_displayed() and submit.size["width"] >= 44  # a thumb-sized target
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@needs_browser
def test_the_event_parser_survives_a_line_ending_split_across_chunks(browser, stack):
    """sse-starlette ends lines with \\r\\n; a network read can end between the \\r and the \\n.
    Normalizing each chunk on its own turned that into an empty line, which cut the event in two:
    its `event:` or `id:` went one way and its data the other (a progress event lost, a terminal
    one read as a nameless `message`)."""
    _open(browser, stack)
    events = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const { readEvents } = await import("/ui/app.js");
        const text = new TextEncoder();
        const chunks = ["id: 1-0\\r", "\\nevent: progress\\r", "\\ndata: {\\"step\\": 3}\\r", "\\n\\r",
                        "\\nid: 2-0\\r\\nevent: succeeded\\r\\ndata: {}\\r\\n\\r\\n"];
        const body = new ReadableStream({ start(c) { for (const s of chunks) c.enqueue(text.encode(s)); c.close(); } });
        const seen = [];
        await readEvents(new Response(body), new AbortController().signal, (e) => { seen.push(e); return false; });
        done(seen);
        """
    )
    assert events == [
        {"event": "progress", "data": '{"step": 3}', "id": "1-0"},
        {"event": "succeeded", "data": "{}", "id": "2-0"},
    ]
