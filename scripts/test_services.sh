#!/usr/bin/env bash
# Debian packages some tests use as real services, installed where this runs as root (as CI does): redis-server
# (the shared KV store), prometheus (scrapes the server; promtool checks deploy/'s rules), chromium and
# chromium-driver (the dashboard in a real browser), and libjemalloc2 (the malloc the moeserve command preloads on
# CPU, moeserve/cpu_runtime.py; it is optional there). Elsewhere, or if the install fails, the tests that need
# them skip and say why. Only the test command needs them, not the main job.
set -uo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
ldconfig -p 2>/dev/null | grep -q "libjemalloc.so" || missing+=(libjemalloc2)
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null \
        || echo "test_services.sh: could not install ${missing[*]}; the tests that need them will skip" >&2
else
    echo "test_services.sh: not root (or no apt-get): ${missing[*]} not installed; the tests that need them" \
         "will skip" >&2
fi
exit 0
