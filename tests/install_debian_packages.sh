#!/usr/bin/env bash
# Debian's packages for the tests of real components: Chromium and ChromeDriver (browser tests), Prometheus with
# promtool (monitoring, replicas), nginx (replicas), buildah and debootstrap (the container image). `make test`
# runs this first. Where they cannot be installed (not root, no sudo, no apt-get), it says so and those tests
# skip, naming the reason. No service starts on install (policy-rc.d): the tests start their own, on test ports.
set -uo pipefail
commands=(chromium chromedriver prometheus promtool nginx buildah debootstrap)
packages=(chromium chromium-driver prometheus nginx buildah debootstrap)
missing=0
for command in "${commands[@]}"; do
  command -v "$command" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null || missing=1
done
[ "$missing" = 0 ] && exit 0
skipping="browser, Prometheus, replica and container tests will skip"
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "$skipping: ${packages[*]} are not all installed and installing them needs root" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "$skipping: ${packages[*]} are not all installed and there is no apt-get" >&2
  exit 0
fi
echo "installing Debian's ${packages[*]} for the browser, monitoring, replica and container tests" >&2
no_services=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$no_services" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$no_services" >/dev/null && "${as_root[@]}" chmod +x "$no_services"
  made_policy=1
fi
if ! { "${as_root[@]}" apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null; }; then
  echo "$skipping: installing their Debian packages failed" >&2
fi
[ "$made_policy" = 1 ] && "${as_root[@]}" rm -f "$no_services"
exit 0
