/* Host unit tests for the bounded JSON parser/writer and the OCI spec
 * adaptation (`make -C agent test`). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <signal.h>

#include "bootopts.h"
#include "json.h"
#include "sigstate.h"
#include "spec.h"
#include "sysctl.h"

static int failed, run;

#define CHECK(cond, ...)                                   \
	do {                                               \
		run++;                                     \
		if (!(cond)) {                             \
			failed++;                          \
			printf("FAIL %s:%d: ", __FILE__, __LINE__); \
			printf(__VA_ARGS__);               \
			printf("\n");                      \
		}                                          \
	} while (0)

static struct jnode nodes[256];
static char keys[64];
#define DOC {nodes, 0, 256, keys, sizeof keys, 0}
static char out[65536];

static void roundtrip(const char *in, const char *want)
{
	struct jdoc d = DOC;
	struct err e = {0};
	size_t len = 0;
	int rc = json_parse(&d, in, strlen(in), &e);
	CHECK(rc == 0, "parse %s: %s", in, e.msg);
	if (rc)
		return;
	rc = json_write(&d, out, sizeof out, &len, &e);
	out[len] = 0;
	CHECK(rc == 0 && !strcmp(out, want), "roundtrip %s -> %s (want %s)", in, out, want);
}

static void bad(const char *in, const char *why)
{
	struct jdoc d = DOC;
	struct err e = {0};
	int rc = json_parse(&d, in, strlen(in), &e);
	CHECK(rc < 0 && strstr(e.msg, why), "bad JSON %s: rc=%d msg=%s (want %s)", in, rc, e.msg, why);
}

static void test_json(void)
{
	roundtrip(" { \"a\" : [1, -2.5e3, true, false, null, \"x\\\"\\u00e9\\n\"], \"b\":{} , \"c\":[]} ",
		  "{\"a\":[1,-2.5e3,true,false,null,\"x\\\"\\u00e9\\n\"],\"b\":{},\"c\":[]}");
	roundtrip("\"s\"", "\"s\"");
	bad("{\"a\":}", "unexpected character");
	bad("{\"a\":1", "unexpected end");
	bad("[1,2] x", "trailing data");
	bad("\"\\q\"", "bad escape");
	bad("\"a\nb\"", "control character");
	bad("tru", "bad literal");
	char deep[200];
	memset(deep, '[', 100);
	memset(deep + 100, ']', 100);
	{
		struct jdoc d = DOC;
		struct err e = {0};
		CHECK(json_parse(&d, deep, 200, &e) < 0 && strstr(e.msg, "deeply"), "depth limit: %s", e.msg);
	}
	{
		static char many[4096];
		strcpy(many, "[");
		for (int i = 0; i < 300; i++)
			strcat(many, i ? ",1" : "1");
		strcat(many, "]");
		struct jdoc d = DOC;
		struct err e = {0};
		CHECK(json_parse(&d, many, strlen(many), &e) < 0 && strstr(e.msg, "more than 256"), "node limit: %s", e.msg);
	}
	{
		const char *s = "{\"k\":\"a\\u00e9\\ud83d\\ude00\\/\\t\",\"n\":5}";
		struct jdoc d = DOC;
		struct err e = {0};
		char buf[64];
		CHECK(json_parse(&d, s, strlen(s), &e) == 0, "parse: %s", e.msg);
		int n = json_str(&d, json_get(&d, 0, "k"), buf, sizeof buf);
		CHECK(n == 9 && !strcmp(buf, "a\xc3\xa9\xf0\x9f\x98\x80/\t"), "unescape: %d %s", n, buf);
		CHECK(json_str(&d, json_get(&d, 0, "n"), buf, sizeof buf) < 0, "number is not a string");
		CHECK(json_str(&d, json_get(&d, 0, "k"), buf, 4) < 0, "too small buffer");
		CHECK(json_get(&d, 0, "missing") < 0, "missing key");
	}
	{
		struct jdoc d = DOC;
		struct err e = {0};
		size_t len = 0;
		const char *s = "{\"a\":[],\"b\":[1]}";
		CHECK(json_parse(&d, s, strlen(s), &e) == 0, "parse: %s", e.msg);
		CHECK(json_append(&d, json_get(&d, 0, "a"), "{\"x\":1}", &e) == 0 &&
			      json_append(&d, json_get(&d, 0, "b"), "2", &e) == 0,
		      "append: %s", e.msg);
		CHECK(json_append(&d, 0, "2", &e) < 0, "append to an object");
		CHECK(json_write(&d, out, sizeof out, &len, &e) == 0 && (out[len] = 0, 1) &&
			      !strcmp(out, "{\"a\":[{\"x\":1}],\"b\":[1,2]}"),
		      "appended: %s", out);
	}
	{
		/* Escaped names are decoded for lookup and re-escaped on output; without a
		 * key buffer (or past its end) they are refused. */
		const char *s = "{\"a\\u0062\":1,\"q\\\"\\n\":2,\"\\u00e9\":3}";
		struct jdoc d = DOC;
		struct err e = {0};
		size_t len = 0;
		CHECK(json_parse(&d, s, strlen(s), &e) == 0, "parse: %s", e.msg);
		CHECK(json_get(&d, 0, "ab") >= 0 && json_get(&d, 0, "q\"\n") >= 0 && json_get(&d, 0, "\xc3\xa9") >= 0,
		      "decoded lookup");
		CHECK(json_write(&d, out, sizeof out, &len, &e) == 0 && (out[len] = 0, 1) &&
			      !strcmp(out, "{\"ab\":1,\"q\\\"\\u000a\":2,\"\xc3\xa9\":3}"),
		      "re-escaped: %s", out);
		struct jdoc bare = {nodes, 0, 256, NULL, 0, 0};
		CHECK(json_parse(&bare, s, strlen(s), &e) < 0 && strstr(e.msg, "escaped member name"), "no key buffer: %s",
		      e.msg);
		char longkey[600] = "{\"";
		for (int i = 0; i < 70; i++)
			strcat(longkey, "\\u0041");
		strcat(longkey, "\":1}");
		CHECK(json_parse(&d, longkey, strlen(longkey), &e) < 0 && strstr(e.msg, "too long"), "key buffer bound: %s",
		      e.msg);
		bad("{\"a\":1,\"b\":2,\"a\":3}", "duplicate member \"a\"");
		roundtrip("[{\"a\":1},{\"a\":2}]", "[{\"a\":1},{\"a\":2}]");
	}
	{
		char q[64];
		CHECK(json_quote("a\"b\\c\n", q, sizeof q) && !strcmp(q, "\"a\\\"b\\\\c\\u000a\""), "quote: %s", q);
	}
}

static char spec_buf[65536];
static struct spec_out so = {spec_buf, sizeof spec_buf, 0, {{{0}, {0}}}, 0, false};

static const char *config =
	"{\"ociVersion\":\"1.0.2\","
	"\"process\":{\"terminal\":true,\"user\":{\"uid\":0,\"gid\":0},\"args\":[\"sh\"],"
	"\"apparmorProfile\":\"cri-containerd.apparmor.d\",\"selinuxLabel\":\"x\","
	"\"capabilities\":{\"bounding\":[\"CAP_KILL\"]},\"rlimits\":[{\"type\":\"RLIMIT_NOFILE\",\"hard\":1024,\"soft\":1024}]},"
	"\"root\":{\"path\":\"/host/rootfs\",\"readonly\":true},"
	"\"hostname\":\"pod\","
	"\"mounts\":[{\"destination\":\"/proc\",\"type\":\"proc\",\"source\":\"proc\"},"
	"{\"destination\":\"/etc/hosts\",\"type\":\"bind\",\"source\":\"/\",\"options\":[\"rbind\",\"ro\"]}],"
	"\"hooks\":{\"prestart\":[{\"path\":\"/bin/x\"}]},"
	"\"linux\":{\"cgroupsPath\":\"/k8s/abc\",\"resources\":{\"memory\":{\"limit\":1048576}},"
	"\"sysctl\":{\"net.ipv4.ip_unprivileged_port_start\":\"0\",\"kernel.msgmax\":\"8192\"},"
	"\"namespaces\":[{\"type\":\"pid\",\"path\":\"/proc/42/ns/pid\"},{\"type\":\"network\",\"path\":\"/var/run/netns/cni-1\"},"
	"{\"type\":\"ipc\",\"path\":\"/proc/42/ns/ipc\"},{\"type\":\"uts\",\"path\":\"/proc/42/ns/uts\"},{\"type\":\"mount\"}],"
	"\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\"},\"maskedPaths\":[\"/proc/kcore\"],\"readonlyPaths\":[\"/proc/sys\"],"
	"\"mountLabel\":\"system_u:object_r\"}}";

#define DENY "{\"names\":[\"socket\"],\"action\":\"SCMP_ACT_ERRNO\",\"errnoRet\":1,\"args\":[{\"index\":0,\"value\":40,\"op\":\"SCMP_CMP_EQ\"}]}"
#define NOT_VSOCK "{\"index\":0,\"value\":40,\"op\":\"SCMP_CMP_NE\"}"

static const char *config_want =
	"{\"ociVersion\":\"1.0.2\","
	"\"process\":{\"terminal\":false,\"user\":{\"uid\":0,\"gid\":0},\"args\":[\"sh\"],"
	"\"capabilities\":{\"bounding\":[\"CAP_KILL\"]},\"rlimits\":[{\"type\":\"RLIMIT_NOFILE\",\"hard\":1024,\"soft\":1024}]},"
	"\"root\":{\"path\":\"/run/disks/x \\\"q\\\"\",\"readonly\":true},"
	"\"hostname\":\"pod\","
	"\"mounts\":[{\"destination\":\"/proc\",\"type\":\"proc\",\"source\":\"proc\"},"
	"{\"destination\":\"/etc/hosts\",\"type\":\"bind\",\"source\":\"/\",\"options\":[\"rbind\",\"ro\"]}],"
	"\"linux\":{\"cgroupsPath\":\"/k8s/abc\",\"resources\":{\"memory\":{\"limit\":1048576}},"
	"\"sysctl\":{\"kernel.msgmax\":\"8192\"},"
	"\"namespaces\":[{\"type\":\"pid\",\"path\":\"/proc/7/ns/pid\"},{\"type\":\"ipc\",\"path\":\"/proc/7/ns/ipc\"},"
	"{\"type\":\"uts\",\"path\":\"/proc/7/ns/uts\"},{\"type\":\"mount\"}],"
	"\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[" DENY "]},"
	"\"maskedPaths\":[\"/proc/kcore\"],\"readonlyPaths\":[\"/proc/sys\"]}}";

/* Containers may not open vsock sockets (issue 15, defect 1). */
static void seccomp_case(const char *linux_, const char *annotations, const char *want, const char *what)
{
	static char spec[4096];
	struct err e = {0};
	snprintf(spec, sizeof spec, "{\"process\":{}%s%s%s%s}", linux_ ? ",\"linux\":" : "", linux_ ? linux_ : "",
		 annotations ? ",\"annotations\":" : "", annotations ? annotations : "");
	int rc = spec_adapt_config(spec, strlen(spec), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[rc == 0 ? so.len : 0] = 0;
	const char *got = strstr(spec_buf, "\"linux\":");
	if (want[0] == '!')
		CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT && strstr(e.msg, want + 1), "%s: rc=%d %s", what, rc, e.msg);
	else if (!want[0])
		CHECK(rc == 0 && !got, "%s: %s\n got %s\nwant no linux object", what, e.msg, spec_buf);
	else
		CHECK(rc == 0 && got && !strncmp(got + 8, want, strlen(want)), "%s: %s\n got %s\nwant %s", what, e.msg,
		      got ? got + 8 : spec_buf, want);
}

static void test_seccomp(void)
{
	/* No profile is unconfined, and stays so: no filter is made up. */
	seccomp_case(NULL, NULL, "", "no linux");
	seccomp_case("{\"seccomp\":null}", NULL, "{\"seccomp\":null}", "null seccomp");
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\"}}", NULL,
		     "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\",\"syscalls\":[" DENY "]}}", "no syscalls");
	/* containerd's default: socket among unconditional allows. It moves to a
	 * rule of its own that excludes AF_VSOCK (libseccomp lets an unconditional
	 * rule win over one with arguments). */
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"read\",\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\"},{\"names\":[\"socket\"],\"action\":\"SCMP_ACT_LOG\"}]}}",
		     NULL,
		     "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"read\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\"}," DENY ",{\"names\":[\"socket\"],\"action\":\"SCMP_ACT_ALLOW\",\"args\":["
		     NOT_VSOCK "]},{\"names\":[\"socket\"],\"action\":\"SCMP_ACT_LOG\",\"args\":[" NOT_VSOCK "]}]}}",
		     "unconditional allow split");
	/* A rule with arguments but none on the family gets the exclusion. */
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\",\"args\":[{\"index\":1,\"value\":1,\"op\":\"SCMP_CMP_EQ\"}]}]}}",
		     NULL,
		     "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\",\"args\":[{\"index\":1,\"value\":1,\"op\":\"SCMP_CMP_EQ\"}," NOT_VSOCK
		     "]}," DENY "]}}",
		     "conditional allow fenced");
	/* Docker's own vsock rule (EQ 40 -> ERRNO, NE 40 -> ALLOW) stays as it is. */
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\",\"args\":[" NOT_VSOCK "]}]}}",
		     NULL,
		     "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\",\"args\":[" NOT_VSOCK "]}," DENY "]}}",
		     "docker's rule kept");
	/* A rule that explicitly lets vsock through is refused, by name. */
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ERRNO\",\"syscalls\":[{\"names\":[\"socket\"],"
		     "\"action\":\"SCMP_ACT_ALLOW\",\"args\":[{\"index\":0,\"value\":41,\"op\":\"SCMP_CMP_LT\"}]}]}}",
		     NULL, "!lets socket() open AF_VSOCK (args[0] SCMP_CMP_LT 41, SCMP_ACT_ALLOW)", "explicit allow refused");
	/* The annotation opts out; anything but true/false is refused. */
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\"}}",
		     "{\"io.cloudhv.container.allow-vsock\":\"true\"}", "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\"}}",
		     "allowed by annotation");
	seccomp_case("{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\"}}",
		     "{\"io.cloudhv.container.allow-vsock\":\"false\"}",
		     "{\"seccomp\":{\"defaultAction\":\"SCMP_ACT_ALLOW\",\"syscalls\":[" DENY "]}}", "annotation false");
	seccomp_case(NULL, "{\"io.cloudhv.container.allow-vsock\":\"yes\"}",
		     "!annotation io.cloudhv.container.allow-vsock: must be \"true\" or \"false\"", "bad annotation");
}

static void test_spec(void)
{
	struct err e = {0};
	int rc = spec_adapt_config(config, strlen(config), "/run/disks/x \"q\"", "/proc/7/ns", false, &so, &e);
	CHECK(rc == 0, "adapt config: %s", e.msg);
	spec_buf[so.len] = 0;
	CHECK(!strcmp(spec_buf, config_want), "adapted config:\n got %s\nwant %s", spec_buf, config_want);
	CHECK(so.n_sysctl == 1 && !strcmp(so.sysctl[0].key, "net.ipv4.ip_unprivileged_port_start") &&
		      !strcmp(so.sysctl[0].val, "0"),
	      "net sysctls taken out: %d", so.n_sysctl);

	CHECK(!so.own_pidns, "a pod PID namespace is not the container's own");

	/* Pod namespaces (CRI NamespaceOption): a path means POD, the pod's shared
	 * one; no path means CONTAINER; no entry means NODE (the VM's). */
	const char *ns = "{\"process\":{},\"linux\":{\"namespaces\":[{\"type\":\"pid\"},{\"type\":\"uts\",\"path\":\"/proc/3/ns/uts\"},"
			 "{\"type\":\"cgroup\",\"path\":\"/proc/3/ns/cgroup\"},{\"type\":\"mount\"}]}}";
	rc = spec_adapt_config(ns, strlen(ns), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && so.own_pidns &&
		      strstr(spec_buf, "\"namespaces\":[{\"type\":\"pid\"},{\"type\":\"uts\",\"path\":\"/proc/7/ns/uts\"},"
				       "{\"type\":\"cgroup\"},{\"type\":\"mount\"}]"),
	      "pod/container namespaces: %s %s", e.msg, spec_buf);
	rc = spec_adapt_config(ns, strlen(ns), "/r", NULL, false, &so, &e);
	CHECK(rc < 0 && e.code == C_FAILED_PRECONDITION && strstr(e.msg, "uts namespace of the pod"),
	      "no pod namespaces to join: %s", e.msg);

	/* A container's sysctls: net.* are taken out for the VM, other namespaced
	 * ones stay for crun, one that is not namespaced is refused by name. */
	const char *sc = "{\"process\":{},\"linux\":{\"sysctl\":{\"kernel.shm_rmid_forced\":\"1\",\"fs.mqueue.msg_max\":\"64\","
			 "\"kernel.domainname\":\"d\",\"net.core.somaxconn\":\"1024\"}}}";
	rc = spec_adapt_config(sc, strlen(sc), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && so.n_sysctl == 1 && !strcmp(so.sysctl[0].key, "net.core.somaxconn") &&
		      strstr(spec_buf, "\"sysctl\":{\"kernel.shm_rmid_forced\":\"1\",\"fs.mqueue.msg_max\":\"64\","
				       "\"kernel.domainname\":\"d\"}"),
	      "namespaced sysctls: %s %s", e.msg, spec_buf);
	const char *sn = "{\"process\":{},\"linux\":{\"sysctl\":{\"vm.overcommit_memory\":\"1\"}}}";
	rc = spec_adapt_config(sn, strlen(sn), "/r", "/proc/7/ns", false, &so, &e);
	CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT && strstr(e.msg, "sysctl vm.overcommit_memory is not namespaced"),
	      "not namespaced: %s", e.msg);

	/* crun without address randomisation: the workload gets a personality
	 * that crun sets before exec, clearing ADDR_NO_RANDOMIZE; one the spec
	 * asks for is kept. Off (KVM), nothing is added. */
	const char *pl = "{\"process\":{},\"linux\":{}}";
	bootopt_crun_fixed_layout = true;
	rc = spec_adapt_config(pl, strlen(pl), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[rc == 0 ? so.len : 0] = 0;
	CHECK(rc == 0 && strstr(spec_buf, "\"linux\":{\"personality\":{\"domain\":\"LINUX\"}}"),
	      "personality reset: %s %s", e.msg, spec_buf);
	const char *p32 = "{\"process\":{},\"linux\":{\"personality\":{\"domain\":\"LINUX32\"}}}";
	rc = spec_adapt_config(p32, strlen(p32), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[rc == 0 ? so.len : 0] = 0;
	CHECK(rc == 0 && strstr(spec_buf, "\"personality\":{\"domain\":\"LINUX32\"}") &&
		      !strstr(spec_buf, "\"LINUX\""),
	      "the spec's own personality: %s %s", e.msg, spec_buf);
	bootopt_crun_fixed_layout = false;
	rc = spec_adapt_config(pl, strlen(pl), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[rc == 0 ? so.len : 0] = 0;
	CHECK(rc == 0 && !strstr(spec_buf, "personality"), "no reset asked: %s %s", e.msg, spec_buf);

	/* The option comes from the kernel command line, as one word of it. */
	const char *cmdline = "/tmp/cloudhv-test-cmdline";
	FILE *f = fopen(cmdline, "w");
	CHECK(f && fputs("console=ttyS0 quiet cloudhv.crun_aslr=offx cloudhv.crun_aslr=of\n", f) >= 0, "write %s", cmdline);
	if (f)
		fclose(f);
	CHECK(bootopts_read(cmdline, &e) == 0 && !bootopt_crun_fixed_layout, "no exact word: %s", e.msg);
	f = fopen(cmdline, "w");
	CHECK(f && fputs("root=/dev/vda quiet cloudhv.crun_aslr=off\n", f) >= 0, "write %s", cmdline);
	if (f)
		fclose(f);
	CHECK(bootopts_read(cmdline, &e) == 0 && bootopt_crun_fixed_layout, "the word at the end: %s", e.msg);
	bootopt_crun_fixed_layout = false;
	unlink(cmdline);
	CHECK(bootopts_read(cmdline, &e) < 0 && !bootopt_crun_fixed_layout, "no file is an error");

	/* No root object, namespaces without paths, network without path. */
	const char *c2 = "{\"process\":{\"args\":[\"true\"]},\"linux\":{\"namespaces\":[{\"type\":\"network\"},{\"type\":\"uts\"}]},\"hostname\":\"h\"}";
	rc = spec_adapt_config(c2, strlen(c2), "/r", "/proc/7/ns", true, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && !strcmp(spec_buf, "{\"process\":{\"args\":[\"true\"],\"terminal\":true},"
					   "\"linux\":{\"namespaces\":[{\"type\":\"uts\"}]},"
					   "\"hostname\":\"h\",\"root\":{\"path\":\"/r\"}}"),
	      "minimal config: %s %s", e.msg, spec_buf);

	const char *c3 = "{\"process\":{},\"mounts\":[{\"destination\":\"/data\",\"type\":\"none\",\"source\":\"/no/such/dir\",\"options\":[\"bind\"]}]}";
	rc = spec_adapt_config(c3, strlen(c3), "/r", "/proc/7/ns", false, &so, &e);
	CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT && strstr(e.msg, "/data"), "missing bind source: %s", e.msg);

	/* A cgroup mount without a cgroup namespace gets one; a namespace that is
	 * there (with a host path) is kept, without its path. */
	const char *c5 = "{\"process\":{},\"mounts\":[{\"destination\":\"/sys/fs/cgroup\",\"type\":\"cgroup\","
			 "\"source\":\"cgroup\"}],\"linux\":{\"namespaces\":[{\"type\":\"pid\"},{\"type\":\"network\"}]}}";
	rc = spec_adapt_config(c5, strlen(c5), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && strstr(spec_buf, "\"namespaces\":[{\"type\":\"pid\"},{\"type\":\"cgroup\"}]"),
	      "cgroup namespace added: %s %s", e.msg, spec_buf);
	const char *c6 = "{\"process\":{},\"mounts\":[{\"destination\":\"/sys/fs/cgroup\",\"type\":\"cgroup2\"}],"
			 "\"linux\":{\"namespaces\":[{\"type\":\"cgroup\",\"path\":\"/proc/9/ns/cgroup\"},{\"type\":\"mount\"}]}}";
	rc = spec_adapt_config(c6, strlen(c6), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && strstr(spec_buf, "\"namespaces\":[{\"type\":\"cgroup\"},{\"type\":\"mount\"}]"),
	      "cgroup namespace kept once: %s %s", e.msg, spec_buf);
	const char *c7 = "{\"process\":{},\"mounts\":[{\"destination\":\"/proc\",\"type\":\"proc\"}],"
			 "\"linux\":{\"namespaces\":[{\"type\":\"mount\"}]}}";
	rc = spec_adapt_config(c7, strlen(c7), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && strstr(spec_buf, "\"namespaces\":[{\"type\":\"mount\"}]"),
	      "no cgroup mount, no cgroup namespace: %s %s", e.msg, spec_buf);

	test_seccomp();

	const char *c4 = "{\"root\":{}}";
	rc = spec_adapt_config(c4, strlen(c4), "/r", "/proc/7/ns", false, &so, &e);
	CHECK(rc < 0 && strstr(e.msg, "no process"), "no process: %s", e.msg);

	rc = spec_adapt_config("[]", 2, "/r", "/proc/7/ns", false, &so, &e);
	CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT, "not an object: %s", e.msg);

	const char *p = "{\"terminal\":false,\"args\":[\"sh\"],\"apparmorProfile\":\"a\",\"selinuxLabel\":\"s\",\"cwd\":\"/\"}";
	rc = spec_adapt_process(p, strlen(p), true, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && !strcmp(spec_buf, "{\"terminal\":true,\"args\":[\"sh\"],\"cwd\":\"/\"}"), "process: %s %s", e.msg, spec_buf);

	/* Escaped member names are matched decoded (issue 15, defect 15): an
	 * LSM label spelt with \u escapes is dropped like a plain one, and a key
	 * that needs escapes is written back escaped. */
	const char *pe = "{\"args\":[\"sh\"],\"selinux\\u004cabel\":\"s\",\"\\u0061pparmorProfile\":\"a\","
			 "\"env\":[\"A=1\"],\"x\\\"y\\u0001\":1}";
	rc = spec_adapt_process(pe, strlen(pe), false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && !strcmp(spec_buf, "{\"args\":[\"sh\"],\"env\":[\"A=1\"],\"x\\\"y\\u0001\":1,\"terminal\":false}"),
	      "escaped keys: %s %s", e.msg, spec_buf);
	/* A second member of the same name would be the one crun reads. */
	const char *pd = "{\"args\":[\"sh\"],\"selinuxLabel\":\"s\",\"selinux\\u004cabel\":\"t\"}";
	rc = spec_adapt_process(pd, strlen(pd), false, &so, &e);
	CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT && strstr(e.msg, "duplicate member \"selinuxLabel\""),
	      "duplicate key: rc=%d %s", rc, e.msg);
	const char *pz = "{\"args\":[\"sh\"],\"a\\u0000b\":1}";
	rc = spec_adapt_process(pz, strlen(pz), false, &so, &e);
	CHECK(rc < 0 && e.code == C_INVALID_ARGUMENT, "NUL in a key: rc=%d %s", rc, e.msg);
	/* The same in a config: the process' label and the linux mountLabel. */
	const char *ce = "{\"process\":{\"args\":[\"sh\"],\"selinux\\u004cabel\":\"s\"},"
			 "\"linux\":{\"mount\\u004cabel\":\"m\"}}";
	rc = spec_adapt_config(ce, strlen(ce), "/r", "/proc/7/ns", false, &so, &e);
	spec_buf[so.len] = 0;
	CHECK(rc == 0 && !strstr(spec_buf, "abel") && !strstr(spec_buf, "\\u"), "escaped keys in a config: %s %s", e.msg,
	      spec_buf);

	/* Output bound. */
	struct spec_out tiny = {spec_buf, 10, 0, {{{0}, {0}}}, 0, false};
	rc = spec_adapt_process(p, strlen(p), true, &tiny, &e);
	CHECK(rc < 0 && e.code == C_RESOURCE_EXHAUSTED, "output bound: %s", e.msg);
}

/* A stop right after start (issue 17): a signal to a PID 1 without a handler
 * is dropped, and must be sent again once the handler is there. */
static void test_sigstate(void)
{
	/* A shell that is PID 1 of its container, before `trap ... TERM` ran. */
	const char *early = "Name:\tsh\nPid:\t812\nNSpid:\t812\t1\nSigPnd:\t0000000000000000\n"
			    "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000002\nSigCgt:\t0000000000010001\n";
	struct sigstate st;
	CHECK(sigstate_parse(early, SIGTERM, &st) == 0 && st.pid1 && !st.caught && !st.ignored && !st.blocked &&
		      signal_would_drop(&st, SIGTERM),
	      "TERM to an early PID 1 is dropped");
	CHECK(sigstate_parse(early, SIGHUP, &st) == 0 && st.caught && !signal_would_drop(&st, SIGHUP), "HUP is caught");
	CHECK(sigstate_parse(early, SIGINT, &st) == 0 && st.ignored && !signal_would_drop(&st, SIGINT), "INT ignored");
	CHECK(sigstate_parse(early, SIGKILL, &st) == 0 && !signal_would_drop(&st, SIGKILL), "KILL is never dropped");
	/* After the trap: caught. */
	const char *late = "NSpid:\t812\t1\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
			   "SigCgt:\t0000000000004000\n";
	CHECK(sigstate_parse(late, SIGTERM, &st) == 0 && st.caught && !signal_would_drop(&st, SIGTERM), "TERM caught");
	/* Not PID 1 (a shared PID namespace, an exec): the default action applies. */
	const char *exec = "NSpid:\t900\t7\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
			   "SigCgt:\t0000000000000000\n";
	CHECK(sigstate_parse(exec, SIGTERM, &st) == 0 && !st.pid1 && !signal_would_drop(&st, SIGTERM), "not PID 1");
	/* Blocked: it stays pending rather than being dropped. */
	const char *blk = "NSpid:\t1\nSigBlk:\t0000000000004000\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
	CHECK(sigstate_parse(blk, SIGTERM, &st) == 0 && st.pid1 && st.blocked && !signal_would_drop(&st, SIGTERM),
	      "blocked");
	CHECK(sigstate_parse("Name:\tx\n", SIGTERM, &st) < 0, "no NSpid line");
	CHECK(sigstate_parse(late, 0, &st) < 0 && sigstate_parse(late, 65, &st) < 0, "signal out of range");
}

static void test_sysctl(void)
{
	static const struct {
		const char *key;
		enum sysctl_ns ns;
	} cases[] = {
		{"kernel.shm_rmid_forced", SYSCTL_IPC}, {"kernel.msgmax", SYSCTL_IPC}, {"kernel.sem", SYSCTL_IPC},
		{"fs.mqueue.msg_max", SYSCTL_IPC},      {"kernel.hostname", SYSCTL_UTS}, {"kernel.domainname", SYSCTL_UTS},
		{"net.ipv4.ip_forward", SYSCTL_NET},    {"kernel.panic", SYSCTL_NOT_NAMESPACED},
		{"fs.mqueue", SYSCTL_NOT_NAMESPACED},   {"kernel.shm_next_id", SYSCTL_NOT_NAMESPACED},
		{"vm.swappiness", SYSCTL_NOT_NAMESPACED},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		CHECK(sysctl_ns_of(cases[i].key) == cases[i].ns, "namespace of %s", cases[i].key);
	char path[64];
	struct err e = {0};
	CHECK(sysctl_path("fs.mqueue.msg_max", path, sizeof path, &e) == 0 && !strcmp(path, "/proc/sys/fs/mqueue/msg_max"),
	      "path: %s", path);
	CHECK(sysctl_path("net/ipv4", path, sizeof path, &e) < 0 && strstr(e.msg, "bad name"), "slash refused");
	CHECK(sysctl_path("net..x", path, sizeof path, &e) < 0, "dot-dot refused");
	CHECK(sysctl_refuse("kernel.panic", &e) < 0 && e.code == C_INVALID_ARGUMENT &&
		      strstr(e.msg, "sysctl kernel.panic is not namespaced"),
	      "refusal names the key: %s", e.msg);
}

int main(void)
{
	test_sysctl();
	test_sigstate();
	test_json();
	test_spec();
	printf("%d checks, %d failed\n", run, failed);
	return failed != 0;
}
