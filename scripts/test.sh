#!/usr/bin/env bash
# Install everything the tests need (Debian peers, Python packages, the OHIF parser from
# npm) and run the test suite. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=""
for tool in storescu echoscu storescp dciodvfy dcentvfy Orthanc ip; do
  command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt=1
command -v chromium >/dev/null 2>&1 || need_apt=1
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt=1
if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      dcmtk orthanc orthanc-dicomweb dicom3tools chromium postgresql iproute2 >/dev/null
  else
    echo "warning: DCMTK/Orthanc/dicom3tools/chromium/PostgreSQL/iproute2 missing and not root; those tests will skip" >&2
  fi
fi
scripts/install.sh --test
if command -v npm >/dev/null 2>&1 && [ -f tests/js/package-lock.json ]; then
  (cd tests/js && npm ci --silent --no-audit --no-fund)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
