#!/bin/sh
# The one-shot index step (the `index` service of docker-compose.yml): builds a collection into
# $RANKD_INDEX_DIR when it does not exist yet, then exits. An existing collection is left alone;
# delete its directory (or the volume) to rebuild it.
#
#   RANKD_CATALOG_FILE          catalogue mounted in the container (CSV, JSONL or Parquet); when
#                               unset, the embedded sample catalogue is indexed instead
#   RANKD_CATALOG_ID_COLUMN     its id column (required with RANKD_CATALOG_FILE)
#   RANKD_CATALOG_TEXT_COLUMN   its text column (required with RANKD_CATALOG_FILE)
#   RANKD_CATALOG_COLLECTION    collection name (default: the file name without its extension)
#   RANKD_CATALOG_INSTRUCTION   the collection's rerank instruction (optional)
#   RANKD_CATALOG_INDEX_TYPE    flat (default), hnsw or ivf
#   RANKD_CATALOG_DEDUP         off (default), exact or near: merge duplicate entries, keeping
#                               the merged ids as aliases (rankd index build --dedup)
#   RANKD_CATALOG_BACKEND       faiss (default: files in the index dir) or milvus (the entries
#                               go to the Milvus at RANKD_MILVUS_URI; the index dir keeps the
#                               manifest)
#   RANKD_INDEX_DIR, RANKD_EMBEDDER_MODEL, RANKD_EMBEDDER_BACKEND, RANKD_EMBEDDER_QUANTIZATION
#                                          as for `rankd serve`
set -eu
index_dir=${RANKD_INDEX_DIR:-/data/index}

if [ -z "${RANKD_CATALOG_FILE:-}" ]; then
  echo "rankd-index-init: RANKD_CATALOG_FILE is not set; indexing the embedded sample catalogue"
  exec python -c 'import pathlib, sys; from retriever.sample import ensure_sample_collection; from service.settings import load_settings; s = load_settings(); ensure_sample_collection(pathlib.Path(sys.argv[1]), s.embedder_model, s.embedder_variant, s.embedder_cache_dir); print("rankd-index-init: sample collection ready")' "$index_dir"
fi

catalog=$RANKD_CATALOG_FILE
if [ ! -f "$catalog" ]; then
  echo "rankd-index-init: RANKD_CATALOG_FILE=$catalog is not a file in the container; put the catalogue in RANKD_CATALOG_DIR (mounted at /data/catalog) and set RANKD_CATALOG_FILE=/data/catalog/<name>" >&2
  exit 2
fi
: "${RANKD_CATALOG_ID_COLUMN:?rankd-index-init: set RANKD_CATALOG_ID_COLUMN to the catalogue id column}"
: "${RANKD_CATALOG_TEXT_COLUMN:?rankd-index-init: set RANKD_CATALOG_TEXT_COLUMN to the catalogue text column}"
name=$(basename "$catalog")
collection=${RANKD_CATALOG_COLLECTION:-${name%.*}}

if [ -f "$index_dir/$collection/manifest.json" ]; then
  echo "rankd-index-init: collection $collection already exists in $index_dir; nothing to do"
  exit 0
fi
echo "rankd-index-init: building collection $collection from $catalog into $index_dir"
set -- --catalog "$catalog" --id-column "$RANKD_CATALOG_ID_COLUMN" \
  --text-column "$RANKD_CATALOG_TEXT_COLUMN" --collection "$collection" --index-dir "$index_dir" \
  --index-type "${RANKD_CATALOG_INDEX_TYPE:-flat}" --backend "${RANKD_CATALOG_BACKEND:-faiss}" \
  --dedup "${RANKD_CATALOG_DEDUP:-off}" --quiet
if [ -n "${RANKD_CATALOG_INSTRUCTION:-}" ]; then
  set -- "$@" --instruction "$RANKD_CATALOG_INSTRUCTION"
fi
exec rankd index build "$@"
