#!/usr/bin/env bash
# Makes sure a headless Chromium is there for the report test (tests/test_bench_report.py): Debian's chromium
# package, installed when missing and we are root with apt-get. Idempotent; without root it says what to run,
# and the test then skips with that reason.
set -euo pipefail

for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null; then
        echo "install_browser.sh: $(command -v "$b")"
        exit 0
    fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install_browser.sh: installing Debian's chromium" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
else
    echo "install_browser.sh: no Chromium; run 'apt-get install chromium' as root (the report test skips)" >&2
fi
