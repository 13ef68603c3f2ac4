#!/usr/bin/env bash
# SimpleTuner-style launcher: reads config/config.env (relative to the current
# directory), then starts the trainer with `accelerate launch`. Never installs anything.
#
#   ENV                     use config/$ENV/config.json (and config/$ENV/config.env)
#   CONFIG_BACKEND          json (the only supported backend)
#   TRAINING_NUM_PROCESSES  processes (GPUs) per machine, default 1; `auto` = the visible GPUs
#                           (CUDA_VISIBLE_DEVICES when set and not empty, else `nvidia-smi -L`)
#   TRAINING_NUM_MACHINES   default 1
#   MIXED_PRECISION         bf16 (default), fp16 or no; the trainer uses fp32 when there is no GPU
#   TRAINING_DYNAMO_BACKEND default no
#   ACCELERATE_EXTRA_ARGS   appended to `accelerate launch` (word-split)
#   DISABLE_UPDATES         accepted for compatibility; this script never updates packages
#   SD_DEMO_PYTHON          the Python to run (default: python3)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -f config/config.env ]]; then
    # shellcheck disable=SC1091
    source config/config.env
fi
if [[ -n "${ENV:-}" && -f "config/${ENV}/config.env" ]]; then
    # shellcheck disable=SC1090
    source "config/${ENV}/config.env"
fi

CONFIG_BACKEND="${CONFIG_BACKEND:-json}"
if [[ "${CONFIG_BACKEND}" != "json" ]]; then
    echo "train.sh: error: CONFIG_BACKEND=${CONFIG_BACKEND} is not supported (only json)" >&2
    exit 2
fi
if [[ -n "${ENV:-}" ]]; then
    config_file="config/${ENV}/config.json"
else
    config_file="config/config.json"
fi
if [[ ! -f "${config_file}" ]]; then
    echo "train.sh: error: ${PWD}/${config_file} not found (run from the directory holding config/)" >&2
    exit 2
fi

TRAINING_NUM_PROCESSES="${TRAINING_NUM_PROCESSES:-1}"
TRAINING_NUM_MACHINES="${TRAINING_NUM_MACHINES:-1}"
MIXED_PRECISION="${MIXED_PRECISION:-bf16}"
TRAINING_DYNAMO_BACKEND="${TRAINING_DYNAMO_BACKEND:-no}"
python="${SD_DEMO_PYTHON:-python3}"

# The number of GPUs this process may use: CUDA_VISIBLE_DEVICES when set and not empty, else nvidia-smi's list.
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local count=0 entry
        IFS=',' read -r -a entries <<< "${CUDA_VISIBLE_DEVICES}"
        for entry in "${entries[@]}"; do
            entry="${entry// /}"
            # CUDA stops at the first invalid entry (-1 is the usual way to hide every GPU)
            [[ -z "${entry}" || "${entry}" == -* || "${entry,,}" == "none" || "${entry}" == "NoDevFiles" ]] && break
            count=$((count + 1))
        done
        echo "${count}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

if [[ "${TRAINING_NUM_PROCESSES}" == "auto" ]]; then
    TRAINING_NUM_PROCESSES="$(visible_gpus)"
    if [[ "${TRAINING_NUM_PROCESSES}" == "0" ]]; then
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            how="CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} names none"
        elif command -v nvidia-smi >/dev/null 2>&1; then
            how="nvidia-smi -L lists none"
        else
            how="no nvidia-smi and CUDA_VISIBLE_DEVICES is unset"
        fi
        echo "train.sh: error: TRAINING_NUM_PROCESSES=auto but no GPU is visible (${how}); run with GPUs or set a number" >&2
        exit 1
    fi
    echo "train.sh: TRAINING_NUM_PROCESSES=auto -> ${TRAINING_NUM_PROCESSES} (visible GPUs)" >&2
fi

for var in TRAINING_NUM_PROCESSES TRAINING_NUM_MACHINES; do
    if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
        echo "train.sh: error: ${var}=${!var} is not a positive integer" >&2
        exit 2
    fi
done
case "${MIXED_PRECISION}" in
    bf16|fp16|no) ;;
    *) echo "train.sh: error: MIXED_PRECISION=${MIXED_PRECISION} is not one of bf16, fp16, no" >&2; exit 2 ;;
esac

read -r -a extra_args <<< "${ACCELERATE_EXTRA_ARGS:-}"

# accelerate launch reports any failure as exit status 1; the trainer writes its own
# status (0, 1, 2, 130) to SD_DEMO_STATUS_FILE so callers see the real one.
export SD_DEMO_STATUS_FILE="${SD_DEMO_STATUS_FILE:-${PWD}/.trainer-status}"
rm -f "${SD_DEMO_STATUS_FILE}"

# A stop signal reaches every process of the group; the trainer then saves a checkpoint
# and exits 130. Survive it here so the trainer's status can still be reported.
stopping=""
trap 'stopping=1' TERM INT

set +e
"${python}" -m accelerate.commands.launch --quiet \
    "${extra_args[@]}" \
    --num_processes="${TRAINING_NUM_PROCESSES}" \
    --num_machines="${TRAINING_NUM_MACHINES}" \
    --mixed_precision="${MIXED_PRECISION}" \
    --dynamo_backend="${TRAINING_DYNAMO_BACKEND}" \
    "${script_dir}/train.py" --config "${config_file}"
status=$?
if [[ -n "${stopping}" ]]; then
    # accelerate's launcher dies on the signal at once; the trainer may still be saving
    for _ in $(seq 1 "${SD_DEMO_STOP_WAIT_S:-300}"); do
        [[ -s "${SD_DEMO_STATUS_FILE}" ]] && break
        sleep 1
    done
fi
if [[ -s "${SD_DEMO_STATUS_FILE}" ]]; then
    status="$(cat "${SD_DEMO_STATUS_FILE}")"
fi
exit "${status}"
