"""HTTPS on the API and the web chat, with a throwaway CA: trusted clients talk, others are refused."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request

import httpx
import pytest
from pydantic import ValidationError

from broker.settings import load_settings
from frontends.openai_api.config import ApiSettings
from frontends.web.chat import EMPTY_REPLY
from frontends.web.config import WebSettings
from tests.certificates import Certificates, make_certificates
from tests.helpers import HELLO, TINY_MODEL
from tests.processes import running_web
from tests.test_openai_api import Api
from tests.test_web_browser import CHROMIUM, CHROMIUM_FLAGS, in_flight, watch


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_args(certificates: Certificates) -> tuple[str, ...]:
    return "--ssl-certfile", str(certificates.cert_file), "--ssl-keyfile", str(certificates.key_file)


@pytest.fixture(scope="module")
def https_api(bus, certificates):
    server = Api(bus.address, *tls_args(certificates), context=certificates.client_context()).wait()
    yield server
    server.stop()


def served_certificate(url: str) -> bytes:
    """The DER certificate the server at `url` presents, taken without verifying it."""
    address = urllib.parse.urlsplit(url)
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((address.hostname, address.port)))


def test_the_api_over_https_answers_and_streams(https_api, certificates):
    assert https_api.url.startswith("https://")
    assert served_certificate(https_api.url) == certificates.server_der()
    client = https_api.client()
    completion = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=5)
    assert completion.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len(chunks) > 3, "streamed as events, not in one piece"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 40


def test_a_client_without_the_ca_is_refused(https_api):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_api.url + "/health")  # the system's CAs only
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(https_api.url + "/health", timeout=10)
    with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP gets no HTTP answer
        httpx.get(https_api.url.replace("https://", "http://") + "/health")


@pytest.mark.parametrize("settings", [ApiSettings, WebSettings])
def test_a_certificate_without_its_key_is_refused_at_start(settings, certificates):
    with pytest.raises(ValidationError, match="--ssl-certfile and --ssl-keyfile go together"):
        load_settings(settings, ["--ssl-certfile", str(certificates.cert_file)])
    with pytest.raises(ValidationError, match="--ssl-certfile and --ssl-keyfile go together"):
        load_settings(settings, ["--ssl-keyfile", str(certificates.key_file)])
    with pytest.raises(ValidationError, match="ssl_keyfile"):
        load_settings(settings, ["--ssl-certfile", str(certificates.cert_file), "--ssl-keyfile", "/nonexistent"])


@pytest.mark.parametrize(("settings", "prefix"), [(ApiSettings, "TOKENBUS_API_"), (WebSettings, "TOKENBUS_WEB_")])
def test_the_files_come_from_the_environment_too(settings, prefix, certificates, monkeypatch):
    monkeypatch.setenv(prefix + "SSL_CERTFILE", str(certificates.cert_file))
    monkeypatch.setenv(prefix + "SSL_KEYFILE", str(certificates.key_file))
    loaded = load_settings(settings, [])
    assert loaded.scheme == "https" and loaded.server_context() is not None
    assert loaded.ssl_keyfile == certificates.key_file


def test_a_key_that_does_not_match_the_certificate_fails_at_start(tmp_path, certificates):
    other = make_certificates(tmp_path)
    settings = load_settings(ApiSettings, ["--ssl-certfile", str(certificates.cert_file),
                                           "--ssl-keyfile", str(other.key_file)])
    with pytest.raises(ssl.SSLError):
        settings.server_context()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make browser)")
def test_the_web_chat_over_https_in_a_real_browser(bus, certificates):
    from playwright.sync_api import sync_playwright

    with running_web(bus.address, *tls_args(certificates), context=certificates.client_context()) as url, \
            sync_playwright() as playwright:
        assert url.startswith("https://")
        # Chromium trusts only its own store: it is told to take any certificate, and the one served is checked here.
        assert served_certificate(url) == certificates.server_der()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(ignore_https_errors=True)
            page.goto(url)
            assert page.evaluate("location.protocol") == "https:"
            page.locator("#message textarea").fill("Hello there")
            page.locator("#send").click()
            bot = page.locator('#chatbot [data-testid="bot"]')

            def reply() -> str:
                texts = bot.all_inner_texts()
                return texts[-1] if texts else ""

            watch(reply, until=lambda: reply().strip() != "" and in_flight(bus.address) == 0)
            # Every note the chat shows starts with ⚠️; the tiny model may write only blank lines, still an answer.
            assert "⚠️" not in reply() or EMPTY_REPLY in reply(), reply()
        finally:
            browser.close()
