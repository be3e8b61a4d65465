#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the browser tests, Prometheus (with promtool) for the monitoring tests,
# buildah and debootstrap for the container test: `make test` runs this first. Where they cannot be installed
# (not root, no sudo, no apt-get), it says so and those tests skip, naming the reason.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v prometheus >/dev/null &&
   command -v promtool >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "browser, Prometheus and container tests will skip: chromium, chromedriver, prometheus, buildah or debootstrap is missing and installing them needs root" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "browser, Prometheus and container tests will skip: chromium, chromedriver, prometheus, buildah or debootstrap is missing and there is no apt-get" >&2
  exit 0
fi
echo "installing Debian's chromium, chromium-driver, prometheus, buildah and debootstrap for the browser, monitoring and container tests" >&2
if ! { "${as_root[@]}" apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium chromium-driver prometheus buildah debootstrap >/dev/null; }; then
  echo "browser, Prometheus and container tests will skip: installing their Debian packages failed" >&2
fi
exit 0
