#!/bin/sh
# certbot deploy hook for Pinaka: installs a renewed certificate where
# TLS_CERT_PATH/TLS_KEY_PATH point and tells pinaka to reload it (SIGHUP via
# the unit's ExecReload). Open connections keep their certificate; new
# handshakes get the new one. If the new pair is bad, pinaka logs
# "certificate reload refused" and keeps serving the old one.
#
#   install -m 0755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/pinaka.sh
#
# certbot runs it as root after every successful renewal, with
# RENEWED_LINEAGE=/etc/letsencrypt/live/<name>. Settings (environment):
#   PINAKA_CERT_NAME  only act for this lineage name (default: any)
#   PINAKA_TLS_DIR    where the pair goes (default /etc/pinaka/tls)
#   PINAKA_GROUP      group that may read the key (default pinaka)
#   PINAKA_RELOAD     reload command (default: systemctl reload pinaka)
set -eu

: "${RENEWED_LINEAGE:?is not set: this script is run by certbot as a deploy hook}"
if [ -n "${PINAKA_CERT_NAME:-}" ] && [ "$(basename "$RENEWED_LINEAGE")" != "$PINAKA_CERT_NAME" ]; then
	exit 0
fi
dest=${PINAKA_TLS_DIR:-/etc/pinaka/tls}
group=${PINAKA_GROUP:-pinaka}
reload=${PINAKA_RELOAD:-systemctl reload pinaka}

install -d -m 0750 -g "$group" "$dest"
# Copy beside the current files, then rename over them, so that pinaka never
# reads a partly written file; the reload is sent once both are in place.
install -m 0644 -g "$group" "$RENEWED_LINEAGE/fullchain.pem" "$dest/.fullchain.pem.new"
install -m 0640 -g "$group" "$RENEWED_LINEAGE/privkey.pem" "$dest/.privkey.pem.new"
mv -f "$dest/.privkey.pem.new" "$dest/privkey.pem"
mv -f "$dest/.fullchain.pem.new" "$dest/fullchain.pem"
$reload
