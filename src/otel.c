/*-------------------------------------------------------------------------
 *
 * otel.c
 *		The OpenTelemetry exporter: a background worker that takes the
 *		finished spans out of shared memory (trace.c) and sends them to an
 *		OTLP/HTTP collector as JSON (POST cqrs.otel_endpoint, normally
 *		http://collector:4318/v1/traces).
 *
 * Every cqrs.otel_naptime, or sooner when the ring is half full, it sends
 * what waits in requests of at most CQRS_OTEL_REQUEST_SPANS spans.  The
 * server log says when a request fails, without the URL (it may hold
 * credentials).  A
 * request that fails (no answer within cqrs.otel_timeout, or a status
 * other than 2xx) loses its spans, counted as failed; the next ones are
 * tried at the next round.  Nothing else waits for it: the command path
 * and the projector only hand spans to the ring, which drops its oldest
 * when full.  With cqrs.otel_endpoint empty, spans stay in the ring for
 * cqrs.spans().
 *
 * Uses libcurl, optional at build time like hiredis: built without it
 * (make WITH_CURL=no), no exporter runs and cqrs.otel_endpoint refuses
 * any value but the empty string.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#ifdef USE_CURL
#include <curl/curl.h>
#endif

#include "cqrs.h"

/* Spans per request: a request of them stays well under 1 MB. */
#define CQRS_OTEL_REQUEST_SPANS	256

char	   *cqrs_otel_endpoint = NULL;
char	   *cqrs_otel_service_name = NULL;
int			cqrs_otel_naptime = 1000;
int			cqrs_otel_timeout = 1000;

/*
 * check_hook of cqrs.otel_endpoint: empty, or an http:// or https:// URL,
 * and only when cqrs was built with libcurl.
 */
bool
cqrs_otel_check_endpoint(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0')
		return true;
#ifndef USE_CURL
	GUC_check_errcode(ERRCODE_FEATURE_NOT_SUPPORTED);
	GUC_check_errmsg("cqrs was built without libcurl: it cannot export spans");
	GUC_check_errhint("Build it with libcurl (the libcurl4-openssl-dev package), or read the spans with cqrs.spans().");
	return false;
#else
	if (strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0)
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("The endpoint is the URL spans are posted to, such as http://127.0.0.1:4318/v1/traces.");
		return false;
	}
	return true;
#endif
}

/*
 * Register the exporter, when there is something to export with.
 */
void
cqrs_otel_register(void)
{
#ifdef USE_CURL
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
	worker.bgw_start_time = BgWorkerStart_PostmasterStart;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cqrs");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cqrs_otel_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cqrs otel exporter");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cqrs otel exporter");
	RegisterBackgroundWorker(&worker);
#endif
}

#ifdef USE_CURL

/* The collector's answer is not read: only its status code counts. */
static size_t
otel_discard(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	return size * nmemb;
}

/* A shutdown request cuts a request short. */
static int
otel_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
			  curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || ShutdownRequestPending) ? 1 : 0;
}

static CURL *curl = NULL;
static struct curl_slist *headers = NULL;
static bool warned = false;		/* since the last request that succeeded */

/*
 * The OTLP/JSON ExportTraceServiceRequest of spans[0 .. n-1]: one
 * resource (service.name), one instrumentation scope.
 */
static void
otel_request(StringInfo buf, const CqrsSpan *spans, int n)
{
	resetStringInfo(buf);
	appendStringInfoString(buf, "{\"resourceSpans\":[{\"resource\":{\"attributes\":["
						   "{\"key\":\"service.name\",\"value\":{\"stringValue\":");
	escape_json(buf, cqrs_otel_service_name);
	appendStringInfoString(buf, "}},{\"key\":\"telemetry.sdk.name\",\"value\":"
						   "{\"stringValue\":\"cqrs\"}}]},"
						   "\"scopeSpans\":[{\"scope\":{\"name\":\"cqrs\"},\"spans\":[");
	for (int i = 0; i < n; i++)
	{
		if (i > 0)
			appendStringInfoChar(buf, ',');
		cqrs_trace_otlp_span(buf, &spans[i]);
	}
	appendStringInfoString(buf, "]}]}]}");
}

/* POST the request; true when the collector answered 2xx. */
static bool
otel_post(StringInfo body)
{
	CURLcode	rc;
	long		status = 0;

	curl_easy_setopt(curl, CURLOPT_URL, cqrs_otel_endpoint);
	curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body->data);
	curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, (long) body->len);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long) cqrs_otel_timeout);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, (long) cqrs_otel_timeout);

	pgstat_report_activity(STATE_RUNNING, "exporting spans");
	rc = curl_easy_perform(curl);
	pgstat_report_activity(STATE_IDLE, NULL);
	if (rc == CURLE_OK)
		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
	if (rc == CURLE_OK && status >= 200 && status < 300)
	{
		if (warned)
			ereport(LOG,
					(errmsg("cqrs exports spans to the collector again")));
		warned = false;
		return true;
	}
	if (!warned)
		ereport(WARNING,
				(errmsg("cqrs could not export spans to the collector (cqrs.otel_endpoint): %s",
						rc != CURLE_OK ? curl_easy_strerror(rc) : psprintf("HTTP status %ld", status)),
				 errdetail("The spans of this request are lost; the next ones are tried in %d ms. This is said once until a request succeeds.",
						   cqrs_otel_naptime)));
	warned = true;
	return false;
}

/* Send every span waiting, request by request, until one fails. */
static void
otel_export(CqrsSpan *spans, StringInfo body)
{
	int			n;

	while ((n = cqrs_trace_take(spans, CQRS_OTEL_REQUEST_SPANS)) > 0)
	{
		bool		ok;

		otel_request(body, spans, n);
		ok = otel_post(body);
		cqrs_trace_exported(n, ok);
		CHECK_FOR_INTERRUPTS();
		if (!ok || n < CQRS_OTEL_REQUEST_SPANS)
			break;
	}
}

static void
otel_exit(int code, Datum arg)
{
	cqrs_trace_set_exporter(NULL);
	if (curl != NULL)
		curl_easy_cleanup(curl);
	curl_slist_free_all(headers);
	curl_global_cleanup();
}

void
cqrs_otel_main(Datum main_arg)
{
	CqrsSpan   *spans;
	StringInfoData body;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0 ||
		(curl = curl_easy_init()) == NULL)
		ereport(ERROR,
				(errmsg("cqrs otel exporter could not initialize libcurl")));
	headers = curl_slist_append(NULL, "Content-Type: application/json");
	/* no "Expect: 100-continue" round trip before each body */
	headers = curl_slist_append(headers, "Expect:");
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(curl, CURLOPT_POST, 1L);
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, otel_discard);
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, otel_progress);
	on_shmem_exit(otel_exit, (Datum) 0);

	spans = MemoryContextAlloc(TopMemoryContext,
							   sizeof(CqrsSpan) * CQRS_OTEL_REQUEST_SPANS);
	initStringInfo(&body);
	cqrs_trace_set_exporter(MyLatch);

	for (;;)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 cqrs_otel_naptime, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (cqrs_otel_endpoint != NULL && cqrs_otel_endpoint[0] != '\0')
			otel_export(spans, &body);
	}
}

#else							/* !USE_CURL */

void
cqrs_otel_main(Datum main_arg)
{
	proc_exit(0);
}

#endif
