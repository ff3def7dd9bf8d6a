"""One round trip through a real Label Studio server started by the test (issue 23).

Label Studio is not one of alrun's dependencies (it pins its own Django stack; ~280 MB of
wheels): install it in a venv of its own and point ``ALRUN_LABEL_STUDIO`` at its
``label-studio`` command. The test talks to the server's REST API (what ``label_studio_sdk``
wraps) with the standard library: create a project with alrun's label config, import alrun's
tasks, submit one annotation per task with a ``lead_time``, export JSON, import into alrun.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.annotation.annotator import ls_result
from tests.annotation.test_import import CLASSES, TRUTH
from tests.annotation.test_oracle import RECORDS, human, wait

COMMAND = os.environ.get("ALRUN_LABEL_STUDIO", "")
TOKEN = "0123456789abcdef0123"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not Path(COMMAND).is_file(), reason="ALRUN_LABEL_STUDIO not set"),
]


def api(base: str, method: str, path: str, body=None):
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def enable_legacy_token(base: str) -> None:
    """Label Studio >= 1.16 disables legacy tokens for new organizations: log in as the user
    (Django session + CSRF) and switch them on, so the REST calls can use ``Token``."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def csrf() -> str:
        return next(c.value for c in jar if c.name == "csrftoken")

    opener.open(base + "/user/login/", timeout=60).read()
    form = {"csrfmiddlewaretoken": csrf(), "email": "alrun@example.com",
            "password": "alrun-test-pw"}  # fmt: skip
    login = urllib.request.Request(base + "/user/login/", urllib.parse.urlencode(form).encode(),
                                   headers={"Referer": base + "/user/login/"})  # fmt: skip
    opener.open(login, timeout=60).read()
    body = json.dumps({"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}).encode()
    settings = urllib.request.Request(base + "/api/jwt/settings", body, method="POST", headers={
        "X-CSRFToken": csrf(), "Referer": base + "/", "Content-Type": "application/json",
    })  # fmt: skip
    assert json.loads(opener.open(settings, timeout=60).read())["legacy_api_tokens_enabled"]


@pytest.fixture
def server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "ls-data"
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data)}
    log = open(tmp_path / "label-studio.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [COMMAND, "start", "--no-browser", "--port", str(port), "--data-dir", str(data),
         "--username", "alrun@example.com", "--password", "alrun-test-pw",
         "--user-token", TOKEN],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # first start migrates its database (minutes)
        while True:
            try:
                urllib.request.urlopen(base + "/api/version", timeout=10).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"label-studio did not start; see {tmp_path / 'label-studio.log'}")
                time.sleep(2)
        enable_legacy_token(base)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_a_batch_round_trips_through_a_real_label_studio(tmp_path, server):
    folder = wait(human(tmp_path)).folder
    project = api(server, "POST", "/api/projects", {
        "title": "alrun batch 1", "label_config": (folder / "labelstudio_config.xml").read_text(),
    })  # fmt: skip
    tasks = json.loads((folder / "labelstudio_tasks.json").read_text())
    api(server, "POST", f"/api/projects/{project['id']}/import", tasks)
    listed = api(server, "GET", f"/api/tasks?project={project['id']}")
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(listed) == 3 and all(t["total_predictions"] == 1 for t in listed)
    for task in listed:
        record = TRUTH[task["data"]["image_id"]]
        api(server, "POST", f"/api/tasks/{task['id']}/annotations", {
            "result": ls_result(record, "box", CLASSES), "lead_time": 2.5 + record.num_boxes,
        })  # fmt: skip
    export = api(server, "GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    (folder / "export" / "label-studio.json").write_text(json.dumps(export))
    answers = human(tmp_path).annotate(RECORDS, "box")
    assert [a.cost_s for a in answers] == [4.5, 2.5, 3.5]
    for answer in answers:
        np.testing.assert_allclose(answer.boxes, TRUTH[answer.image_id].boxes, atol=1e-3)
