"""The directory where Envoy and its longform workers meet (control_plane/longform/sockets.py):
made private, and refused where another user could reach or replace the sockets in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from control_plane.longform.sockets import SocketDirProblem, ensure_private
from harness.processes import PYTHON, REPO, socket_dir


def test_a_missing_directory_is_made_for_this_user_alone(tmp_path):
    made = ensure_private(tmp_path / "run" / "sockets")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700 and made.stat().st_uid == os.geteuid()
    assert ensure_private(made) == made  # and taken as it is the next time


@pytest.mark.parametrize("mode", [0o755, 0o710, 0o701, 0o777])
def test_a_directory_others_may_enter_is_refused(tmp_path, mode):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(SocketDirProblem, match=f"may be entered by others \\(mode {mode:o}\\): `chmod 700 {folder}`"):
        ensure_private(folder)


def test_a_link_is_refused_even_to_a_private_directory(tmp_path):
    private = ensure_private(tmp_path / "private")
    (tmp_path / "link").symlink_to(private)
    with pytest.raises(SocketDirProblem, match="is not a directory"):
        ensure_private(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
def test_another_users_directory_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(SocketDirProblem, match="belongs to user 65534"):
        ensure_private(folder)


@pytest.mark.e2e
def test_a_worker_will_not_listen_where_others_may_enter():
    """`whisper-gateway longform-worker` on a socket in a directory others may enter: it says why and
    exits 2, having listened on nothing."""
    folder = Path(socket_dir())
    folder.chmod(0o777)
    worker = subprocess.run([PYTHON, "-m", "control_plane", "longform-worker", "--listen", f"unix:{folder}/worker-0.sock",
                             "--pieces", f"unix:{folder}/pieces.sock"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert worker.returncode == 2, worker.stderr
    assert f"longform.socket_dir {folder} may be entered by others (mode 777)" in worker.stderr
    assert list(folder.iterdir()) == []
