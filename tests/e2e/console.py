"""The web console in a real browser: headless Chromium driven over WebDriver (selenium).

Usage: python3 console.py BASE_URL ADMIN_KEY USER_KEY SCREENSHOT_DIR
       python3 console.py BASE_URL - - SCREENSHOT_DIR   (a server without keys)
The server runs the tiny synthetic model with the adapters `mix-a` and `mix-b`, and online
tuning on. Exits non-zero, naming the failed check. Each scenario saves a PNG of the page it
ends on in SCREENSHOT_DIR.
"""
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

base, admin_key, user_key, shots = sys.argv[1:5]
os.makedirs(shots, exist_ok=True)

# What the server's `str::trim` strips: Unicode White_Space. Python's `strip()` also strips the
# separators U+001C..U+001F, which a random model's answer may end with.
RUST_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in "\x1c\x1d\x1e\x1f")


def rust_trim(text):
    return text.strip(RUST_WHITESPACE)


def check(name, condition, detail=""):
    if not condition:
        sys.exit(f"FAILED: {name} {detail}")
    print(f"ok: {name}")


def api(method, path, body=None, key=admin_key):
    request = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def browser(width=1280, height=900):
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def console_errors(driver, allowed=()):
    """SEVERE browser-log entries, except those naming an `allowed` fragment."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def until(driver, condition, what, timeout=60):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception:
        driver.save_screenshot(os.path.join(shots, "failure.png"))
        check(what, False, "(timed out; failure.png saved)")


def by_id(driver, id_):
    return driver.find_element(By.ID, id_)


def shot(driver, name):
    driver.save_screenshot(os.path.join(shots, f"{name}.png"))


# Seed an adapter tuned online with distinct pairs of one pattern, for the training scenarios.
pairs = [{"messages": [{"role": "user", "content": f"Say code word number {i}."},
                       {"role": "assistant", "content": "The code word is zebra."}]} for i in range(24)]
api("POST", "/v1/adapters/notes/feedback", pairs)

if admin_key == "-":
    # Without keys the console works as it is: no key asked, every panel there.
    driver = browser()
    try:
        driver.get(base + "/")
        until(driver, lambda d: "Open server" in by_id(d, "scope").text, "an open server needs no key")
        check("no key is asked", not by_id(driver, "key-panel").is_displayed())
        check("every tab is there", all(t.is_displayed() for t in driver.find_elements(By.CSS_SELECTOR, ".tab")))
        by_id(driver, "user-message").send_keys("hello" + Keys.ENTER)
        until(driver, lambda d: "tok/s" in by_id(d, "chat-stats").text, "chat works without keys")
        shot(driver, "open-server")
        errors = console_errors(driver)
        check("no console errors on an open server", not errors, errors)
    finally:
        driver.quit()
    print("all console checks passed (open server)")
    sys.exit(0)

# The page and its files come with a strict Content-Security-Policy.
for path in ["/", "/console/app.js", "/console/style.css"]:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        policy = response.headers.get("Content-Security-Policy", "")
    check(f"{path} has a strict CSP", "script-src 'self'" in policy and "unsafe" not in policy and "default-src 'none'" in policy, policy)

UNLABELLED = """return [...document.querySelectorAll('input, select, textarea, button')]
    .filter((el) => el.offsetParent !== null)
    .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
    .map((el) => el.outerHTML.slice(0, 80));"""

driver = browser()
try:
    # Keys: asked once per tab, kept in sessionStorage.
    driver.get(base + "/")
    until(driver, lambda d: by_id(d, "key-panel").is_displayed(), "the console asks for a key")
    by_id(driver, "key-input").send_keys(admin_key + Keys.ENTER)
    until(driver, lambda d: "admin" in by_id(d, "scope").text, "the admin key signs in")
    check("the key is kept in sessionStorage", driver.execute_script("return sessionStorage.getItem('tessera-key')") == admin_key)
    check("the key is in no URL", admin_key not in driver.current_url)
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#mix-rows .mix-row")) >= 2, "the adapters are offered for the mix")

    # Chat streams an answer.
    by_id(driver, "temperature").clear()
    by_id(driver, "temperature").send_keys("0")
    by_id(driver, "max-tokens").clear()
    by_id(driver, "max-tokens").send_keys("24")
    by_id(driver, "user-message").send_keys("Tell me about tiles" + Keys.ENTER)
    until(driver, lambda d: "tok/s" in by_id(d, "chat-stats").text, "chat streams an answer")
    answer = driver.find_elements(By.CSS_SELECTOR, "#conversation li.assistant")[-1].get_attribute("textContent")
    check("the answer is shown", len(answer) > 0 and "24 tokens" in by_id(driver, "chat-stats").text, (answer, by_id(driver, "chat-stats").text))
    shot(driver, "chat")

    # A mix of two adapters, scales set on the sliders with the keyboard.
    rows = driver.find_elements(By.CSS_SELECTOR, "#mix-rows .mix-row")
    names = [r.find_element(By.CSS_SELECTOR, "input[type=range]").get_attribute("data-adapter") for r in rows]
    for name, presses, key in [("mix-a", 10, Keys.ARROW_LEFT), ("mix-b", 6, Keys.ARROW_RIGHT)]:
        row = rows[names.index(name)]
        row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").send_keys(Keys.SPACE)
        slider = row.find_element(By.CSS_SELECTOR, "input[type=range]")
        for _ in range(presses):
            slider.send_keys(key)
    by_id(driver, "user-message").send_keys("Mix them" + Keys.ENTER)
    until(driver, lambda d: "mix-a ×0.50" in by_id(d, "chat-stats").text, "the mix is sent with the sliders' scales")
    stats = by_id(driver, "chat-stats").text
    check("both adapters answered", "mix-a ×0.50" in stats and "mix-b ×1.30" in stats and "mix-a@" in stats and "mix-b@" in stats, stats)
    shot(driver, "mix")

    # A correction becomes a stored feedback pair.
    Select(by_id(driver, "feedback-target")).select_by_value("notes")
    by_id(driver, "corrected").clear()
    by_id(driver, "corrected").send_keys("A tessera is one tile of a mosaic.")
    by_id(driver, "send-correction").click()
    until(driver, lambda d: "Stored in notes" in by_id(d, "feedback-result").text, "the correction is stored")
    stored = api("GET", "/v1/adapters/notes/feedback?limit=100")["data"]
    check("the corrected reply is a pair", any(p["messages"][-1]["content"] == "A tessera is one tile of a mosaic." for p in stored))
    shot(driver, "correction")

    # A correction for a new adapter creates it of the kind picked; the adapters table says so.
    Select(by_id(driver, "feedback-target")).select_by_value("")
    check("the kind can be picked for a new adapter", by_id(driver, "feedback-method").is_enabled())
    by_id(driver, "feedback-new").send_keys("scales")
    Select(by_id(driver, "feedback-method")).select_by_value("ia3")
    by_id(driver, "send-correction").click()
    until(driver, lambda d: "Stored in scales" in by_id(d, "feedback-result").text, "the correction creates the new adapter")
    check("the new adapter is IA³", api("GET", "/v1/adapters/scales")["kind"] == "ia3")
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=adapters]").click()
    kind_of = """return [...document.querySelectorAll('#adapters-table tbody tr')]
        .filter((row) => row.cells[0].textContent === arguments[0]).map((row) => row.cells[1].textContent);"""
    until(driver, lambda d: d.execute_script(kind_of, "scales") == ["IA³"], "the Kind column says IA³")
    check("the Kind column says LoRA for an adapter created without a pick", driver.execute_script(kind_of, "notes") == ["LoRA"],
          driver.execute_script(kind_of, "notes"))
    shot(driver, "kind")
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=chat]").click()

    # A training job started from the page: a loss chart that grows, then promotion.
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=training]").click()
    until(driver, lambda d: "notes" in [o.get_attribute("value") for o in Select(by_id(d, "train-adapter")).options], "the adapter can be trained")
    Select(by_id(driver, "train-adapter")).select_by_value("notes")
    driver.find_element(By.CSS_SELECTOR, "#train-form button[type=submit]").click()
    until(driver, lambda d: int(by_id(d, "loss-chart").get_attribute("data-points") or 0) >= 2, "the loss chart shows two points", 180)
    until(driver, lambda d: by_id(d, "job-status").text == "succeeded", "the job succeeds", 300)
    line = driver.find_element(By.CSS_SELECTOR, "#loss-chart polyline").get_attribute("points").split()
    steps = [float(point.split(",")[0]) for point in line]
    check("the loss curve runs in step order to the last step", steps == sorted(steps) and "step 12/12" in by_id(driver, "job-eta").text.replace(" ", " "), (steps, by_id(driver, "job-eta").text))
    decision = by_id(driver, "job-decision").text
    check("the job ends promoted", "is now served" in decision, decision)
    shot(driver, "training")
    served = api("GET", "/v1/adapters/notes")["version"]

    # A rollback from the page changes the served version.
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=adapters]").click()
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Details of notes']"), "the adapter is listed")
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Details of notes']").click()
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#versions-table button"), "older versions can be served")
    driver.find_element(By.CSS_SELECTOR, "#versions-table button").click()
    until(driver, lambda d: "is served" in by_id(d, "detail-result").text, "the rollback is confirmed")
    check("the rollback changed the served version", api("GET", "/v1/adapters/notes")["version"] != served)
    shot(driver, "rollback")

    # 👎 with a better answer stores a preference for the adapter that answered: the model's
    # answer rejected, the correction chosen. 👎 without one answers again; 👍 on the new answer
    # prefers it to the one it replaced.
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=chat]").click()
    for row in driver.find_elements(By.CSS_SELECTOR, "#mix-rows .mix-row"):
        box = row.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if box.is_selected():
            box.send_keys(Keys.SPACE)
    Select(by_id(driver, "model")).select_by_value("notes")
    Select(by_id(driver, "feedback-target")).select_by_value("mix-a")
    answers = lambda d: [li for li in d.find_elements(By.CSS_SELECTOR, "#conversation li.assistant") if "replaced" not in li.get_attribute("class")]
    # Sampled, until the random model's answer is more than blanks (an empty answer has nothing
    # to be preferred to).
    by_id(driver, "temperature").clear()
    by_id(driver, "temperature").send_keys("1")
    for _ in range(5):
        before = len(driver.find_elements(By.CSS_SELECTOR, "#conversation li.assistant"))
        by_id(driver, "user-message").send_keys("What is a tessera?" + Keys.ENTER)
        until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#conversation li.assistant")) > before and by_id(d, "send").is_enabled()
              and by_id(d, "correction").is_displayed(), "the tuned adapter answers")
        model_answer = answers(driver)[-1].get_attribute("textContent")
        if model_answer.strip():
            break
    check("the tuned adapter answers more than blanks", model_answer.strip(), repr(model_answer))
    by_id(driver, "corrected").clear()
    by_id(driver, "corrected").send_keys("A tessera is one small tile.")
    by_id(driver, "thumbs-down").click()
    until(driver, lambda d: "Preference stored in notes" in by_id(d, "feedback-result").text, "the thumbs-down stores a preference")
    preferences = api("GET", "/v1/adapters/notes/preferences?limit=100")["data"]
    check("chosen: the correction; rejected: the model's answer; for the adapter that answered",
          any(p["chosen"] == "A tessera is one small tile." and p["rejected"] == rust_trim(model_answer)
              and p["prompt"][-1]["content"] == "What is a tessera?" for p in preferences), (model_answer, preferences))
    by_id(driver, "thumbs-down").click()
    until(driver, lambda d: "Another answer" in by_id(d, "feedback-result").text, "a thumbs-down without a correction answers again")
    check("the replaced answer is struck through", driver.find_elements(By.CSS_SELECTOR, "#conversation li.replaced"))
    regenerated = answers(driver)[-1].get_attribute("textContent")
    by_id(driver, "thumbs-up").click()
    until(driver, lambda d: "2 preference(s) in all" in by_id(d, "feedback-result").text, "the thumbs-up stores the other way round")
    preferences = api("GET", "/v1/adapters/notes/preferences?limit=100")["data"]
    check("the regenerated answer is preferred to the one it replaced",
          any(p["chosen"] == regenerated.strip() and p["rejected"] == "A tessera is one small tile." for p in preferences), (regenerated, preferences))
    shot(driver, "preference")
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=adapters]").click()

    # A bad upload shows the server's error message.
    junk = os.path.join(shots, "junk.zip")
    with open(junk, "wb") as f:
        f.write(b"this is not a zip archive")
    by_id(driver, "upload-name").send_keys("broken")
    by_id(driver, "upload-files").send_keys(junk)
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    until(driver, lambda d: "Refused:" in by_id(d, "upload-result").text, "a bad upload is refused")
    check("the server's message is shown", "zip" in by_id(driver, "upload-result").text.lower(), by_id(driver, "upload-result").text)
    shot(driver, "bad-upload")

    # Plugins and the server panel.
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=server]").click()
    until(driver, lambda d: "Tokens/s" in by_id(d, "server-stats").text, "the server panel shows the metrics")
    shot(driver, "server")
    for panel in ["chat", "adapters", "training", "server"]:
        driver.find_element(By.CSS_SELECTOR, f".tab[data-panel={panel}]").click()
        unlabelled = driver.execute_script(UNLABELLED)
        check(f"every control of the {panel} panel is labelled", not unlabelled, unlabelled)
    errors = console_errors(driver, allowed=("status of 400",))
    check("no console errors as admin (other than the refused upload's 400)", not errors, errors)

    # A narrow window still reads.
    driver.set_window_size(420, 900)
    driver.find_element(By.CSS_SELECTOR, ".tab[data-panel=chat]").click()
    check("the chat fits a narrow window", driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"))
    shot(driver, "narrow")
finally:
    driver.quit()

# Without the admin key, the admin panels are absent.
driver = browser()
try:
    driver.get(base + "/")
    until(driver, lambda d: by_id(d, "key-panel").is_displayed(), "a second tab asks for its own key")
    by_id(driver, "key-input").send_keys(user_key + Keys.ENTER)
    until(driver, lambda d: "inference" in by_id(d, "scope").text, "the inference key signs in")
    check("no admin tabs", not any(t.is_displayed() for t in driver.find_elements(By.CSS_SELECTOR, ".admin-only, .tune-only")))
    check("no admin panels", not driver.find_elements(By.ID, "panel-adapters") and not driver.find_elements(By.ID, "panel-server"))
    by_id(driver, "user-message").send_keys("hello" + Keys.ENTER)
    until(driver, lambda d: "tok/s" in by_id(d, "chat-stats").text, "chat works with the inference key")
    check("no correction form without a tuning key", not by_id(driver, "correction").is_displayed())
    shot(driver, "inference-only")
    errors = console_errors(driver)
    check("no console errors with the inference key", not errors, errors)
finally:
    driver.quit()
print("all console checks passed")
