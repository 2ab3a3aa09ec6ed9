# Shared steps of the tools/reproduce_*.sh scripts; source it, don't run it.
#   train NAME CONFIG [--set k=v ...]   trains runs/NAME, resumes it when it was cut off (also from a
#                                        committed checkpoints/NAME.partial/), skips it when done
#   restore NAME FILE                   puts a finished run's committed model (checkpoints/FILE, with
#                                        its .log.jsonl and .eval.json when kept) back in runs/NAME/,
#                                        so that train skips it; train does this itself for
#                                        checkpoints/NAME.safetensors
#   evaluate NAME                        Set5, Set14, BSD100 scores of runs/NAME into runs/NAME/eval.json
#   bicubic SCALE                        the same for bicubic, into runs/bicubic-xSCALE/eval.json
# One torch thread per job, so several jobs can share the machine.
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1

train() {
    local name=$1 config=$2; shift 2
    restore "$name" "$name.safetensors"   # finished in an earlier session and committed (runs/ is not)
    [ -f "runs/$name/model.safetensors" ] && return 0
    mkdir -p runs
    # A run cut off at the end of an earlier session and committed (runs/ is not): continue it.
    if [ ! -d "runs/$name" ] && [ -f "checkpoints/$name.partial/state.pt" ]; then
        cp -r "checkpoints/$name.partial" "runs/$name"
    fi
    if [ -f "runs/$name/state.pt" ]; then
        # Cut off earlier: --resume trains the run's saved runs/NAME/config.json (CONFIG and the
        # --set options are not repeated: a differing value would be an error); only the thread
        # count may change between legs.
        sparsesr train -q -o "runs/$name" --resume --set train.threads=1 >> "runs/$name.log" 2>&1
    else
        sparsesr train -q -c "$config" -o "runs/$name" --set train.threads=1 "$@" > "runs/$name.log" 2>&1
    fi
}

restore() {
    local name=$1 file=$2
    if [ ! -f "runs/$name/model.safetensors" ] && [ -f "checkpoints/$file" ]; then
        mkdir -p "runs/$name"
        cp "checkpoints/$file" "runs/$name/model.safetensors"
        # its log and scores too, when they were kept beside it (CHECKPOINT.log.jsonl, CHECKPOINT.eval.json)
        [ -f "checkpoints/${file%.safetensors}.log.jsonl" ] && cp "checkpoints/${file%.safetensors}.log.jsonl" "runs/$name/log.jsonl"
        [ -f "checkpoints/${file%.safetensors}.eval.json" ] && cp "checkpoints/${file%.safetensors}.eval.json" "runs/$name/eval.json"
    fi
    return 0
}

_scores() {  # out_dir model [eval options...]
    local dir=$1; shift
    [ -f "$dir/eval.json" ] && return 0
    mkdir -p "$dir"
    sparsesr eval -q --json "$@" --data "$DATA/val/Set5" "$DATA/test/Set14" "$DATA/test/BSD100" > "$dir/eval.json.tmp"
    mv "$dir/eval.json.tmp" "$dir/eval.json"
}
evaluate() { _scores "runs/$1" --model "runs/$1/model.safetensors"; }
bicubic() { _scores "runs/bicubic-x$1" --model bicubic --scale "$1"; }
export -f train restore evaluate _scores bicubic
export DATA
