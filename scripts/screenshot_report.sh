#!/bin/sh
# Render RUN/report.html in headless Chromium at a desktop and a phone width.
#
#   scripts/screenshot_report.sh RUN [OUTDIR]
#
# writes OUTDIR/report-desktop.png (1200 px wide) and OUTDIR/report-phone.png
# (390 px wide, as an iPhone 12-15 in portrait); OUTDIR defaults to RUN.
# Chromium runs offline: no network, no sync, a throw-away profile.
# Needs Debian's chromium (apt-get install chromium) or CHROMIUM=/path/to/chrome.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 RUN [OUTDIR]" >&2
    exit 2
fi
run=$1
outdir=${2:-$run}
report="$(cd "$run" && pwd)/report.html"
if [ ! -f "$report" ]; then
    echo "error: $report not found; write it with: aevb report $run" >&2
    exit 2
fi
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$browser" ]; then
    echo "error: no chromium found; install it (apt-get install chromium) or set CHROMIUM" >&2
    exit 3
fi
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

shot() {  # shot NAME WIDTH HEIGHT
    "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --disable-extensions --hide-scrollbars --user-data-dir="$profile" \
        --window-size="$2,$3" --screenshot="$outdir/$1" "file://$report" >/dev/null 2>&1
    test -s "$outdir/$1"
    echo "written: $outdir/$1"
}

shot report-desktop.png 1200 "${DESKTOP_HEIGHT:-3000}"
shot report-phone.png 390 "${PHONE_HEIGHT:-5000}"
