#!/bin/sh
# envmgr's stand-in for `conda` inside method images, which carry no conda.
# It understands what the training platform's start line needs:
#   conda run -n <env> [--no-capture-output] [--live-stream] [--cwd DIR] CMD [ARGS...]
#   conda env list | conda info --envs
# Environments live in /opt/envmgr/envs/<env>.
set -e
ENVS=/opt/envmgr/envs

list_envs() {
    echo "# conda environments (envmgr):"
    for d in "$ENVS"/*; do [ -d "$d" ] && printf '%-20s %s\n' "$(basename "$d")" "$d"; done
}

case "${1:-}" in
    run)
        shift
        name=""; cwd=""
        while [ $# -gt 0 ]; do
            case "$1" in
                -n|--name) name="$2"; shift 2 ;;
                -n=*|--name=*) name="${1#*=}"; shift ;;
                -p|--prefix) name="$(basename "$2")"; shift 2 ;;
                --cwd) cwd="$2"; shift 2 ;;
                --no-capture-output|--live-stream|-s|--no-banner|--debug-wrapper-scripts) shift ;;
                --) shift; break ;;
                -*) echo "conda (envmgr shim): unsupported option $1" >&2; exit 2 ;;
                *) break ;;
            esac
        done
        [ -n "$name" ] || { echo "conda (envmgr shim): conda run needs -n <env>" >&2; exit 2; }
        prefix="$ENVS/$name"
        if [ ! -d "$prefix" ]; then
            echo "EnvironmentLocationNotFound: Not a conda environment: $prefix" >&2
            list_envs >&2
            exit 1
        fi
        [ $# -gt 0 ] || { echo "conda (envmgr shim): conda run needs a command" >&2; exit 2; }
        export VIRTUAL_ENV="$prefix" CONDA_PREFIX="$prefix" CONDA_DEFAULT_ENV="$name"
        export PATH="$prefix/bin:$PATH"
        if [ -d "$prefix/etc/conda/activate.d" ]; then
            for script in "$prefix"/etc/conda/activate.d/*.sh; do [ -f "$script" ] && . "$script"; done
        fi
        [ -z "$cwd" ] || cd "$cwd"
        exec "$@"
        ;;
    env)
        [ "${2:-}" = "list" ] && { list_envs; exit 0; } ;;
    info)
        [ "${2:-}" = "--envs" ] || [ "${2:-}" = "-e" ] && { list_envs; exit 0; } ;;
    --version|-V)
        echo "conda 0.0 (envmgr shim)"; exit 0 ;;
esac
echo "conda (envmgr shim): only 'conda run -n ENV CMD...' and 'conda env list' work in envmgr images" >&2
exit 2
