#!/bin/sh
# The image's first process: runs "$@" as the unprivileged `lambda` user.
# Lambda itself starts containers as an unprivileged user (then this is a no-op); `docker run` and
# `sam local` start them as root, and here root is dropped before any project code runs. The image has
# no USER instruction on purpose: `sam local` builds a layer on top of it whose RUN must run as root.
set -eu
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid="${RUN_AS_UID:-1000}" --regid="${RUN_AS_GID:-1000}" --clear-groups -- "$@"
fi
exec "$@"
