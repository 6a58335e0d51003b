#!/bin/sh
# The CI step with curl and jq only: start a refresh of a job, wait for it, gate on the
# refreshed student's metric, and download the dataset the next student trains on.
#
#   DISTILL_URL=https://distill.example.com DISTILL_API_KEY=dst_... \
#   DISTILL_IDEMPOTENCY_KEY="gh-$GITHUB_RUN_ID" DISTILL_NOTE="$GITHUB_SHA" \
#     sh refresh.sh JOB_ID [MIN_METRIC] [OUT_FILE]
#
# Exit codes as `distill refresh` (docs/ci.md): 0 done, 1 the job failed or was cancelled,
# 2 the server refused the request, 3 timeout (DISTILL_TIMEOUT seconds, default 3600),
# 4 the metric is below MIN_METRIC. A re-run with the same DISTILL_IDEMPOTENCY_KEY waits for
# the same refresh instead of starting another.
set -eu
job=$1
min_metric=${2:-}
out=${3:-dataset.jsonl}
deadline=$(($(date +%s) + ${DISTILL_TIMEOUT:-3600}))
poll=${DISTILL_POLL_S:-5}
idempotency_key=${DISTILL_IDEMPOTENCY_KEY:-ci-$(date +%s)-$$}

api() {
  # --retry: connection refused, 408, 429 and 5xx; safe for the POST thanks to the key.
  curl -sS --retry 5 --retry-connrefused -H "Authorization: Bearer $DISTILL_API_KEY" "$@"
}

# 1. Start the refresh (202), or find the one this key started (200).
body=$(jq -n --arg note "${DISTILL_NOTE:-}" '{note: (if $note == "" then null else $note end)}')
response=$(api -X POST -H "Content-Type: application/json" -H "Idempotency-Key: $idempotency_key" \
  -d "$body" -w '\n%{http_code}' "$DISTILL_URL/v1/jobs/$job/refresh")
status=$(printf '%s\n' "$response" | tail -n 1)
refresh=$(printf '%s\n' "$response" | sed '$d')
case $status in
  200 | 202) ;;
  *) echo "refresh refused (HTTP $status): $refresh" >&2; exit 2 ;;
esac
id=$(printf '%s' "$refresh" | jq -r .id)

# 2. Wait while its outcome is "waiting".
while outcome=$(printf '%s' "$refresh" | jq -r .outcome) && [ "$outcome" = waiting ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "timed out: refresh $id still waiting" >&2; exit 3; fi
  sleep "$poll"
  refresh=$(api -f "$DISTILL_URL/v1/jobs/$job/refreshes/$id")
done
if [ "$outcome" = failed ] || [ "$outcome" = cancelled ]; then
  echo "job $job $outcome: $(printf '%s' "$refresh" | jq -r '.job_status_reason // ""')" >&2
  exit 1
fi

# 3. The quality gate: the refreshed student's metric against MIN_METRIC.
metric=$(printf '%s' "$refresh" | jq -r '.metric // "none"')
gate=passed
if [ -n "$min_metric" ] &&
  ! printf '%s' "$refresh" | jq -e --argjson min "$min_metric" '.metric != null and .metric >= $min' >/dev/null; then
  gate=failed
fi

# 4. Export the dataset to train on next (as of the refresh's newest iteration when the
#    student is trained outside the loop), wait for the file, download it.
request=$(printf '%s' "$refresh" | jq -c '{format: "jsonl"} + (if .dataset_iteration == null then {} else {iteration: .dataset_iteration} end)')
export=$(api -f -X POST -H "Content-Type: application/json" -d "$request" "$DISTILL_URL/v1/jobs/$job/exports")
export_id=$(printf '%s' "$export" | jq -r .id)
while state=$(printf '%s' "$export" | jq -r .status) && [ "$state" != succeeded ]; do
  if [ "$state" = failed ]; then echo "export $export_id failed" >&2; exit 1; fi
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "timed out: export $export_id" >&2; exit 3; fi
  sleep "$poll"
  export=$(api -f "$DISTILL_URL/v1/exports/$export_id")
done
api -f -o "$out" "$DISTILL_URL/v1/exports/$export_id/download"

echo "refresh $id: $outcome, metric $metric, gate $gate; dataset $out"
if [ "$gate" = failed ]; then echo "quality gate failed: metric $metric < $min_metric" >&2; exit 4; fi
