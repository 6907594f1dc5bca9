"""Policy hot reload from a Kubernetes ConfigMap volume.

The kubelet never edits a mounted ConfigMap file in place: it writes the new contents into a fresh
timestamped folder, points the ``..data`` symlink at it with one rename, and deletes the old
folder; every visible file is a symlink through ``..data``. The gateway sees the files through
those symlinks, so the swap must read as a change, and the extra entries (``..data``, the
timestamped folders) must not be read as policy files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.test_metering import policy_yaml, upstream_yaml
from tests.waiting import wait_until

OLD_KEY, NEW_KEY = "sk-cm-old", "sk-cm-new"


class ConfigMapVolume:
    """A folder laid out as the kubelet's atomic writer lays out a ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.generation = 0

    def publish(self, files: dict[str, str]) -> None:
        self.generation += 1
        stamp = f"..2026_12_04_00_00_0{self.generation}.{1000 + self.generation}"
        folder = self.root / stamp
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.rename(tmp, data)  # the one atomic step
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.root / old)


def chat(proc: Process, key: str) -> int:
    body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "cm"}], "max_tokens": 5}
    return httpx.post(
        proc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def test_configmap_symlink_swap_reloads_policies(tmp_path: Path, sim: Process) -> None:
    config = write_gateway(tmp_path, upstream_yaml(sim), policy_yaml("t", OLD_KEY), name="cm")
    volume = ConfigMapVolume(tmp_path / "mounted-policies")
    volume.publish({"tenant.yaml": policy_yaml("t", OLD_KEY)})
    text = config.read_text().replace("policies_dir: cm-policies", "policies_dir: mounted-policies")
    config.write_text(text + "\nrouting: {policy_reload_s: 0.2}\n")
    proc = start_gateway(config)
    try:
        assert chat(proc, OLD_KEY) == 200
        assert chat(proc, NEW_KEY) == 401
        # same size on purpose: only the swap itself tells the files apart
        new = policy_yaml("t", NEW_KEY)
        assert len(new) == len(policy_yaml("t", OLD_KEY)) and hashed(NEW_KEY) in new
        volume.publish({"tenant.yaml": new})
        wait_until(lambda: chat(proc, NEW_KEY) == 200, timeout=10)
        assert chat(proc, OLD_KEY) == 401
        assert "policies reloaded" in proc.output()
        assert "policy reload rejected" not in proc.output()
    finally:
        proc.stop()
