#!/bin/sh
# Demo stand-in for the box's config daemon.
echo "box-config-daemon $(cat /opt/opq/current/VERSION 2>/dev/null) running"
exec sleep infinity
