"""scripts/setup_env.sh: a full disk is a one-line error before anything is installed."""
import os
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_setup_refuses_a_disk_without_room_for_torch(tmp_path):
    venv = tmp_path / "venv"
    env = dict(os.environ, VENV=str(venv), SETUP_NEED_GB="10000000")
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GB free where" in lines[0] and "rerun make setup" in lines[0]
    assert not venv.exists()  # nothing half-made
