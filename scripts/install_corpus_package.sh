#!/bin/sh
# Installs the Debian package whose Python documentation sources are the tiny transformer's offline corpus:
# python3-doc (PSF licence, ~12 MB download). Needs root (or sudo); does nothing when it is already there.
set -e
PKG=python3-doc
if ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1; then
    echo "$PKG is installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
# a fresh machine may have no package lists yet: update only when the first try fails
$SUDO apt-get install -y --no-install-recommends "$PKG" || {
    $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "$PKG"
}
