# Sourced by the install scripts: `apt_install WHO PACKAGE...` installs the packages from Debian
# without starting their services (a policy-rc.d that refuses, unless one is already in place),
# updating the package lists once if the first try fails. Needs root; WHO names the caller in
# its messages.
apt_install() {
  local who=$1
  shift
  if [[ $(id -u) -ne 0 ]]; then
    echo "$who: need root to install $* (apt-get install -y $*)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local policy=/usr/sbin/policy-rc.d
  APT_OWN_POLICY=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && APT_OWN_POLICY=1
  fi
  trap '[[ ${APT_OWN_POLICY:-0} == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
  if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}
