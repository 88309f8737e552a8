package deploy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/joho/godotenv"

	"github.com/pinaka-proxy/pinaka/internal/collector"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
)

// repoRoot is the repository root: the Docker build context.
const repoRoot = ".."

// testVersion is substituted for the Dockerfile's ${VERSION}.
const testVersion = "v0.0.0-deploytest"

// rustVariables are the Rust proxy's variable names in SPEC.md's table
// order; the example file must list them first, in this order.
var rustVariables = []string{
	"PROXY_PORT", "PROXY_BIND", "HTTP_PROXY_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH",
	"JWT_SECRET", "BACKEND_URL", "BACKEND_API_KEY", "PROBE_NODE_NAME", "PROBE_NODE_REGION",
	"RATE_LIMIT_REQUESTS_PER_MINUTE", "RATE_LIMIT_BURST_SIZE", "RATE_LIMIT_MAX_TOKENS",
	"RUST_LOG", "LOG_LEVEL", "EGRESS_ALLOW_CIDRS", "EGRESS_DENY_CIDRS", "ALLOWED_PORTS",
	"DNS_SERVERS", "ADMIN_ADDR", "LOG_BATCH_SIZE", "LOG_BATCH_INTERVAL", "LOG_SPOOL_DIR",
	"SHUTDOWN_TIMEOUT",
}

// ---- Dockerfile ----------------------------------------------------------

type instruction struct {
	cmd  string // upper-cased keyword
	args string
}

type stage struct {
	from, name string
	instrs     []instruction
}

// parseDockerfile splits a Dockerfile into stages of instructions, joining
// continuation lines and dropping comments.
func parseDockerfile(t *testing.T, path string) []stage {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var stages []stage
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		cmd, args, _ := strings.Cut(line, " ")
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			s := stage{from: f[0]}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				s.name = f[2]
			}
			stages = append(stages, s)
			return
		}
		if len(stages) == 0 {
			if in.cmd != "ARG" {
				t.Fatalf("instruction before FROM: %s", line)
			}
			return
		}
		stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
	}
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") {
			continue
		}
		if rest, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(rest + " ")
			continue
		}
		cur.WriteString(trimmed)
		flush()
	}
	flush()
	return stages
}

func (s stage) all(cmd string) []string {
	var out []string
	for _, in := range s.instrs {
		if in.cmd == cmd {
			out = append(out, in.args)
		}
	}
	return out
}

// shellWords splits a simple shell command line: whitespace-separated words,
// double quotes grouping, && ending the command.
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted = !quoted
			inWord = true
		case (r == ' ' || r == '\t') && !quoted:
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	if i := slices.Index(words, "&&"); i >= 0 {
		words = words[:i]
	}
	return words
}

// goBuild is the Dockerfile's `go build` command: environment assignments
// before it and its arguments.
type goBuild struct {
	env  []string
	args []string // after "go build"
}

func dockerGoBuild(t *testing.T, stages []stage) goBuild {
	t.Helper()
	for _, s := range stages {
		for _, run := range s.all("RUN") {
			words := shellWords(run)
			i := slices.Index(words, "go")
			if i < 0 || i+1 >= len(words) || words[i+1] != "build" {
				continue
			}
			var gb goBuild
			for _, w := range words[:i] {
				if strings.Contains(w, "=") {
					gb.env = append(gb.env, w)
				}
			}
			gb.args = words[i+2:]
			return gb
		}
	}
	t.Fatal("Dockerfile has no RUN ... go build line")
	return goBuild{}
}

func goModMinor(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)(\.\d+)?\s*$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	return string(m[1])
}

func TestDockerfile(t *testing.T) {
	stages := parseDockerfile(t, "Dockerfile")
	if len(stages) < 2 {
		t.Fatalf("want a multi-stage Dockerfile, got %d stage(s)", len(stages))
	}

	builder := stages[0]
	wantGo := goModMinor(t)
	if !regexp.MustCompile(`^golang:` + regexp.QuoteMeta(wantGo) + `(\.\d+)?(-[a-z0-9.]+)?$`).MatchString(builder.from) {
		t.Errorf("builder FROM %q: want golang:%s-... to match go.mod's go line", builder.from, wantGo)
	}
	if builder.name == "" {
		t.Errorf("builder stage has no name (FROM ... AS build)")
	}

	gb := dockerGoBuild(t, stages)
	build := strings.Join(gb.args, " ")
	if !slices.Contains(gb.env, "CGO_ENABLED=0") {
		t.Errorf("go build runs without CGO_ENABLED=0 (env %v)", gb.env)
	}
	if !slices.Contains(gb.args, "-trimpath") {
		t.Errorf("go build lacks -trimpath: %s", build)
	}
	i := slices.Index(gb.args, "-ldflags")
	if i < 0 || i+1 >= len(gb.args) {
		t.Fatalf("go build lacks -ldflags: %s", build)
	}
	ld := strings.Fields(gb.args[i+1])
	for _, f := range []string{"-s", "-w", "-X"} {
		if !slices.Contains(ld, f) {
			t.Errorf("-ldflags %q lacks %s", gb.args[i+1], f)
		}
	}
	if !strings.Contains(gb.args[i+1], "main.version=${VERSION}") {
		t.Errorf("-ldflags %q does not set main.version from the VERSION build arg", gb.args[i+1])
	}
	if gb.args[len(gb.args)-1] != "./cmd/pinaka" {
		t.Errorf("go build does not build ./cmd/pinaka: %s", build)
	}

	final := stages[len(stages)-1]
	switch {
	case final.from == "scratch":
		// An empty base needs CA roots for https origins and BACKEND_URL,
		// and a passwd entry for the USER name.
		copies := strings.Join(final.all("COPY"), "\n")
		if !strings.Contains(copies, "ca-certificates.crt") {
			t.Errorf("scratch image without CA certificates")
		}
		if !strings.Contains(copies, "/etc/passwd") {
			t.Errorf("scratch image without /etc/passwd for USER nonroot")
		}
		if !strings.Contains(strings.Join(builder.all("RUN"), "\n"), "nonroot:x:65532:65532") {
			t.Errorf("builder does not write a nonroot passwd entry")
		}
	case regexp.MustCompile(`distroless/static[^:]*:nonroot$`).MatchString(final.from):
	default:
		t.Errorf("runtime FROM %q: want scratch or distroless/static:nonroot", final.from)
	}
	users := final.all("USER")
	if len(users) == 0 || !strings.HasPrefix(users[len(users)-1], "nonroot") {
		t.Errorf("runtime stage USER %v, want nonroot", users)
	}
	exposed := strings.Fields(strings.Join(final.all("EXPOSE"), " "))
	for _, p := range []string{"443", "9090"} {
		if !slices.Contains(exposed, p) {
			t.Errorf("EXPOSE %v lacks %s", exposed, p)
		}
	}
	env := dockerEnv(final)
	if env["ADMIN_ADDR"] != "0.0.0.0:9090" {
		t.Errorf("runtime ENV ADMIN_ADDR=%q, want 0.0.0.0:9090 (reachable for probes)", env["ADMIN_ADDR"])
	}
	known := codeVariables(t)
	for k := range env {
		if !known[k] {
			t.Errorf("runtime ENV sets %s, which the code does not read", k)
		}
	}
	entry := strings.Join(final.all("ENTRYPOINT"), " ")
	if !strings.Contains(entry, "/usr/local/bin/pinaka") {
		t.Errorf("ENTRYPOINT %q does not run /usr/local/bin/pinaka", entry)
	}
	if !strings.Contains(strings.Join(final.all("COPY"), "\n"), "--from="+builder.name+" /out/pinaka /usr/local/bin/pinaka") {
		t.Errorf("runtime stage does not copy the built binary to /usr/local/bin/pinaka")
	}
}

// dockerEnv collects the KEY=value pairs of a stage's ENV instructions.
func dockerEnv(s stage) map[string]string {
	env := map[string]string{}
	for _, e := range s.all("ENV") {
		for _, w := range shellWords(e) {
			if k, v, ok := strings.Cut(w, "="); ok {
				env[k] = v
			}
		}
	}
	return env
}

func TestDockerignoreKeepsSecretsOut(t *testing.T) {
	b, err := os.ReadFile("Dockerfile.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for _, want := range []string{".git", ".env", "**/.env", "bin"} {
		if !slices.Contains(lines, want) {
			t.Errorf("Dockerfile.dockerignore lacks %q", want)
		}
	}
}

// ---- The static binary ---------------------------------------------------

// binary builds cmd/pinaka once per test run with the Dockerfile's own
// go build line.
type binary struct {
	once sync.Once
	dir  string
	path string
	err  error
}

var built binary

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pinaka-deploy-test-")
	if err != nil {
		panic(err)
	}
	built.dir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func staticBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the release binary; skipped with -short")
	}
	gb := dockerGoBuild(t, parseDockerfile(t, "Dockerfile"))
	built.once.Do(func() {
		out := filepath.Join(built.dir, "pinaka")
		args := []string{"build"}
		for i := 0; i < len(gb.args); i++ {
			a := strings.ReplaceAll(gb.args[i], "${VERSION}", testVersion)
			if a == "-o" { // our output path instead of the image's
				i++
				a = "-o=" + out
			}
			args = append(args, a)
		}
		cmd := exec.Command("go", args...)
		cmd.Dir = repoRoot
		cmd.Env = append(os.Environ(), gb.env...)
		if b, err := cmd.CombinedOutput(); err != nil {
			built.err = errors.New("go " + strings.Join(args, " ") + ": " + err.Error() + "\n" + string(b))
			return
		}
		built.path = out
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.path
}

func TestStaticBinary(t *testing.T) {
	bin := staticBinary(t)
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a %v program header: not static", p.Type)
		}
	}
	if s := f.Section(".dynamic"); s != nil {
		t.Errorf("binary has a .dynamic section: not static")
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("binary needs shared libraries %v", libs)
	}
	if s := f.Section(".symtab"); s != nil {
		t.Errorf("binary has a symbol table: -ldflags -s not applied")
	}

	// -trimpath: no path of this machine's checkout in the binary.
	abs, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte(abs+"/")) {
		t.Errorf("binary contains the build path %s: -trimpath not applied", abs)
	}

	cmd := exec.Command(bin, "version")
	cmd.Env = []string{} // the binary needs nothing from the environment
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pinaka version: %v\n%s", err, out)
	}
	if got, want := strings.TrimSpace(string(out)), "pinaka "+testVersion; got != want {
		t.Errorf("pinaka version = %q, want %q (-X main.version)", got, want)
	}

	// The static binary runs a real command end to end, with no .env file
	// and only the container's variables.
	cmd = exec.Command(bin, "check-config", "--dev", "--env-file", "/dev/null")
	cmd.Env = []string{"ADMIN_ADDR=0.0.0.0:9090", "LOG_SPOOL_DIR=/var/lib/pinaka/spool"}
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pinaka check-config --dev: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "configuration OK") || !regexp.MustCompile(`ADMIN_ADDR\s+0\.0\.0\.0:9090`).Match(out) {
		t.Errorf("check-config output lacks the settings:\n%s", out)
	}
}

// ---- systemd -------------------------------------------------------------

// unitDirectives reads a unit file's Key=value lines (all sections).
func unitDirectives(t *testing.T, path string) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: not Key=value: %q", path, line)
		}
		d[k] = append(d[k], v)
	}
	return d
}

func TestServiceUnitDirectives(t *testing.T) {
	d := unitDirectives(t, "pinaka.service")
	want := map[string]string{
		"Type":                    "exec",
		"User":                    "pinaka",
		"EnvironmentFile":         "/etc/pinaka/pinaka.env",
		"ExecReload":              "/bin/kill -HUP $MAINPID",
		"Restart":                 "on-failure",
		"AmbientCapabilities":     "CAP_NET_BIND_SERVICE",
		"CapabilityBoundingSet":   "CAP_NET_BIND_SERVICE",
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "strict",
		"ProtectHome":             "yes",
		"PrivateTmp":              "yes",
		"PrivateDevices":          "yes",
		"ProtectKernelTunables":   "yes",
		"ProtectKernelModules":    "yes",
		"ProtectKernelLogs":       "yes",
		"ProtectControlGroups":    "yes",
		"RestrictNamespaces":      "yes",
		"LockPersonality":         "yes",
		"MemoryDenyWriteExecute":  "yes",
		"LimitNOFILE":             "1048576",
		"SystemCallArchitectures": "native",
	}
	for k, v := range want {
		if got := d[k]; len(got) != 1 || got[0] != v {
			t.Errorf("%s=%v, want %s", k, got, v)
		}
	}
	if got := d["ExecStart"]; len(got) != 1 || !strings.HasPrefix(got[0], "/usr/local/bin/pinaka serve") {
		t.Errorf("ExecStart=%v, want /usr/local/bin/pinaka serve ...", got)
	}
	if !slices.Contains(d["SystemCallFilter"], "@system-service") {
		t.Errorf("SystemCallFilter=%v lacks @system-service", d["SystemCallFilter"])
	}
	// The proxy enumerates its interface addresses over netlink to refuse
	// connecting to itself; without AF_NETLINK that silently fails.
	fams := strings.Fields(strings.Join(d["RestrictAddressFamilies"], " "))
	for _, f := range []string{"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"} {
		if !slices.Contains(fams, f) {
			t.Errorf("RestrictAddressFamilies=%v lacks %s", fams, f)
		}
	}
	// The spool directory must be writable under ProtectSystem=strict.
	example, err := godotenv.Read("pinaka.env.example")
	if err != nil {
		t.Fatal(err)
	}
	spool := example["LOG_SPOOL_DIR"]
	writable := false
	for _, sd := range strings.Fields(strings.Join(d["StateDirectory"], " ")) {
		writable = writable || spool == "/var/lib/"+sd || strings.HasPrefix(spool, "/var/lib/"+sd+"/")
	}
	for _, p := range strings.Fields(strings.Join(d["ReadWritePaths"], " ")) {
		writable = writable || strings.HasPrefix(spool, strings.TrimPrefix(p, "-"))
	}
	if spool == "" || !writable {
		t.Errorf("example LOG_SPOOL_DIR=%q is not under StateDirectory=%v or ReadWritePaths=%v", spool, d["StateDirectory"], d["ReadWritePaths"])
	}

	// systemd must outwait the whole shutdown: the default drain plus the
	// close and record flush after it.
	cfg, err := config.Load(func(string) (string, bool) { return "", false }, true)
	if err != nil {
		t.Fatal(err)
	}
	stop, err := time.ParseDuration(strings.Join(d["TimeoutStopSec"], ""))
	if err != nil {
		t.Fatalf("TimeoutStopSec=%v: %v", d["TimeoutStopSec"], err)
	}
	if min := cfg.ShutdownTimeout + 15*time.Second; stop < min {
		t.Errorf("TimeoutStopSec=%v, want at least SHUTDOWN_TIMEOUT (%v) + 15s for the close and the record flush", stop, cfg.ShutdownTimeout)
	}
}

// TestServiceUnitsVerify runs systemd-analyze verify on each unit, with
// ExecStart pointed at the freshly built binary, and fails on anything it
// says about the unit. It also requires a low exposure score from
// systemd-analyze security.
func TestServiceUnitsVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed (scripts/deps.sh installs it)")
	}
	bin := staticBinary(t)
	units, err := filepath.Glob("*.service")
	if err != nil || len(units) == 0 {
		t.Fatalf("no unit files: %v", err)
	}
	for _, unit := range units {
		t.Run(unit, func(t *testing.T) {
			b, err := os.ReadFile(unit)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte("\nExecStart=/usr/local/bin/pinaka ")) {
				t.Fatalf("%s: ExecStart does not run /usr/local/bin/pinaka", unit)
			}
			b = bytes.ReplaceAll(b, []byte("\nExecStart=/usr/local/bin/pinaka "), []byte("\nExecStart="+bin+" "))
			dir := t.TempDir()
			path := filepath.Join(dir, unit)
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}

			out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
			for _, line := range strings.Split(string(out), "\n") {
				// Other units on this machine may draw warnings; ours may not.
				if strings.Contains(line, dir) || strings.Contains(line, unit) {
					t.Errorf("systemd-analyze verify: %s", line)
				}
			}
			if err != nil {
				t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
			}

			// Exposure 0.0 (locked down) to 10.0 (unprotected); --threshold
			// is in tenths.
			sec := exec.Command("systemd-analyze", "security", "--offline=true", "--threshold=20", path)
			out, err = sec.CombinedOutput()
			if bytes.Contains(out, []byte("unrecognized option")) {
				t.Skipf("systemd-analyze security --offline not supported: %s", out)
			}
			if err != nil {
				t.Errorf("exposure level above 2.0: %v\n%s", err, out)
			}
		})
	}
}

func TestSysusers(t *testing.T) {
	if _, err := exec.LookPath("systemd-sysusers"); err != nil {
		t.Skip("systemd-sysusers not installed")
	}
	root := t.TempDir()
	conf := filepath.Join(root, "usr/lib/sysusers.d")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("pinaka.sysusers")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "pinaka.conf"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-sysusers", "--root="+root).CombinedOutput(); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	passwd, err := os.ReadFile(filepath.Join(root, "etc/passwd"))
	if err != nil {
		t.Fatal(err)
	}
	user := unitDirectives(t, "pinaka.service")["User"]
	if len(user) != 1 || !regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(user[0])+`:x:\d+:\d+:[^:]*:/var/lib/pinaka:/usr/sbin/nologin$`).Match(passwd) {
		t.Errorf("sysusers did not create the unit's User=%v as a nologin system user:\n%s", user, passwd)
	}
}

// ---- The example environment file ----------------------------------------

// envLine is one NAME=value line of the example, commented out or not.
type envLine struct {
	name, value string
	commented   bool // "#NAME=value": shows the default
	line        int
}

var (
	assignRe = regexp.MustCompile(`^(#?)([A-Z][A-Z0-9_]*)=(.*)$`)
	// Values every reader (systemd, docker --env-file, godotenv) takes
	// literally: no quotes, spaces, comments or $ expansions.
	plainValueRe = regexp.MustCompile(`^[A-Za-z0-9_./:,*@+-]*$`)
)

func readExample(t *testing.T) []envLine {
	t.Helper()
	b, err := os.ReadFile("pinaka.env.example")
	if err != nil {
		t.Fatal(err)
	}
	var out []envLine
	prevComment := false
	for i, line := range strings.Split(string(b), "\n") {
		m := assignRe.FindStringSubmatch(line)
		switch {
		case m != nil:
			if !plainValueRe.MatchString(m[3]) {
				t.Errorf("line %d: value %q is not plain (systemd, docker and godotenv may read it differently)", i+1, m[3])
			}
			if !prevComment && (len(out) == 0 || out[len(out)-1].line != i) {
				t.Errorf("line %d: %s has no comment line above it", i+1, m[2])
			}
			out = append(out, envLine{name: m[2], value: m[3], commented: m[1] == "#", line: i + 1})
			prevComment = false
		case strings.HasPrefix(line, "#"):
			prevComment = true
		case strings.TrimSpace(line) == "":
			prevComment = false
		default:
			t.Errorf("line %d: neither a comment nor NAME=value: %q", i+1, line)
		}
	}
	return out
}

// codeVariables extracts the variable names the code reads: every all-caps
// string literal passed as a first argument in internal/config and the
// collector's configuration (p.str("PROXY_PORT", ...), lookup("RUST_LOG"),
// get("DATABASE_URL", ...)).
func codeVariables(t *testing.T) map[string]bool {
	t.Helper()
	re := regexp.MustCompile(`\w\(\s*"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"`)
	names := map[string]bool{}
	for _, f := range []struct {
		path string
		min  int
	}{
		{filepath.Join(repoRoot, "internal/config/config.go"), 40},
		{filepath.Join(repoRoot, "internal/collector/config.go"), 4},
		{filepath.Join(repoRoot, "internal/config/backendtls.go"), 3},
	} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		found := re.FindAllSubmatch(b, -1)
		if len(found) < f.min {
			t.Fatalf("found only %d variable names in %s; has the code changed shape?", len(found), f.path)
		}
		for _, m := range found {
			names[string(m[1])] = true
		}
	}
	// Tracing passes the standard OTEL_* variables on to the SDK from a
	// list (tracingVars), not one call per name.
	b, err := os.ReadFile(filepath.Join(repoRoot, "internal/config/tracing.go"))
	if err != nil {
		t.Fatal(err)
	}
	found := regexp.MustCompile(`"((?:OTEL|TRACE)_[A-Z0-9_]+)"`).FindAllSubmatch(b, -1)
	if len(found) < 5 {
		t.Fatalf("found only %d variable names in internal/config/tracing.go; has the code changed shape?", len(found))
	}
	for _, m := range found {
		names[string(m[1])] = true
	}
	return names
}

func TestEnvExampleListsEveryVariable(t *testing.T) {
	lines := readExample(t)
	inExample := map[string]bool{}
	for _, l := range lines {
		if inExample[l.name] {
			t.Errorf("line %d: %s listed twice", l.line, l.name)
		}
		inExample[l.name] = true
	}
	code := codeVariables(t)
	for name := range code {
		// The standard OTEL_* set goes to the SDK as it is; the example
		// shows the common ones and OPERATIONS.md "Tracing" the rest.
		if !inExample[name] && !strings.HasPrefix(name, "OTEL_") {
			t.Errorf("%s is read by the code but missing from pinaka.env.example", name)
		}
	}
	for name := range inExample {
		if !code[name] {
			t.Errorf("pinaka.env.example lists %s, which the code does not read", name)
		}
	}
	if len(lines) < len(rustVariables) {
		t.Fatalf("only %d variables", len(lines))
	}
	for i, want := range rustVariables {
		if lines[i].name != want {
			t.Errorf("variable %d is %s, want %s (the Rust proxy's variables first, in SPEC order)", i+1, lines[i].name, want)
		}
	}
}

// requiredValues fill what the example leaves for the operator.
func requiredValues(t *testing.T) map[string]string {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	for _, p := range []string{cert, key} {
		if err := os.WriteFile(p, []byte("placeholder"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return map[string]string{
		"TLS_CERT_PATH": cert,
		"TLS_KEY_PATH":  key,
		"JWT_SECRET":    strings.Repeat("s", config.MinSecretBytes),
		"DATABASE_URL":  "postgres://pinaka@127.0.0.1:5432/pinaka?sslmode=disable",
	}
}

func mapLookup(m map[string]string) config.Lookup {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// TestEnvExampleLoads loads the example as godotenv (pinaka --env-file)
// reads it, with the required values filled, through config.Load and the
// collector's LoadConfig.
func TestEnvExampleLoads(t *testing.T) {
	file, err := godotenv.Read("pinaka.env.example")
	if err != nil {
		t.Fatal(err)
	}
	// No usable secret ships in the example: an unedited copy must not start.
	if v, ok := file["JWT_SECRET"]; !ok || v != "" {
		t.Errorf("JWT_SECRET=%q in the example, want present and empty", v)
	}
	for k, v := range requiredValues(t) {
		file[k] = v
	}
	cfg, err := config.Load(mapLookup(file), false)
	if err != nil {
		t.Fatalf("config.Load(example): %v", err)
	}
	if cfg.LogSpoolDir != "/var/lib/pinaka/spool" || cfg.TLSCertPath != file["TLS_CERT_PATH"] {
		t.Errorf("example values not loaded: LogSpoolDir=%q TLSCertPath=%q", cfg.LogSpoolDir, cfg.TLSCertPath)
	}
	if _, err := collector.LoadConfig(mapLookup(file)); err == nil {
		t.Errorf("collector.LoadConfig accepted the example without an API key")
	}
	file["COLLECTOR_API_KEY"] = strings.Repeat("k", 32)
	if _, err := collector.LoadConfig(mapLookup(file)); err != nil {
		t.Errorf("collector.LoadConfig(example): %v", err)
	}
}

// TestEnvExampleDefaults uncomments every "#NAME=value" line and checks that
// the configuration is exactly the one without them: the defaults the file
// documents are the code's.
func TestEnvExampleDefaults(t *testing.T) {
	base := requiredValues(t)
	base["COLLECTOR_API_KEY"] = strings.Repeat("k", 32)
	withDefaults := map[string]string{}
	for k, v := range base {
		withDefaults[k] = v
	}
	n := 0
	for _, l := range readExample(t) {
		if l.commented && l.value != "" {
			withDefaults[l.name] = l.value
			n++
		}
	}
	if n < 30 {
		t.Fatalf("only %d documented defaults", n)
	}
	for _, dev := range []bool{false, true} {
		want, err := config.Load(mapLookup(base), dev)
		if err != nil {
			t.Fatal(err)
		}
		got, err := config.Load(mapLookup(withDefaults), dev)
		if err != nil {
			t.Fatalf("loading the documented defaults: %v", err)
		}
		if dev {
			// serve --dev has its own listener defaults; the example
			// documents production ones.
			got.ProxyPort, got.ProxyBind = want.ProxyPort, want.ProxyBind
		}
		gv, wv := reflect.ValueOf(*got), reflect.ValueOf(*want)
		for i := range gv.NumField() {
			if !reflect.DeepEqual(gv.Field(i).Interface(), wv.Field(i).Interface()) {
				t.Errorf("dev=%v: documented default of Config.%s is %v, the code's is %v",
					dev, gv.Type().Field(i).Name, gv.Field(i).Interface(), wv.Field(i).Interface())
			}
		}
	}
	want, err := collector.LoadConfig(mapLookup(base))
	if err != nil {
		t.Fatal(err)
	}
	got, err := collector.LoadConfig(mapLookup(withDefaults))
	if err != nil {
		t.Fatalf("collector: loading the documented defaults: %v", err)
	}
	if got != want {
		t.Errorf("collector: documented defaults differ from the code's:\n got %+v\nwant %+v", got, want)
	}
}

// ---- certbot deploy hook -------------------------------------------------

func TestCertbotDeployHook(t *testing.T) {
	lineage := filepath.Join(t.TempDir(), "live", "proxy.example")
	if err := os.MkdirAll(lineage, 0o700); err != nil {
		t.Fatal(err)
	}
	_, certPEM, keyPEM, err := selfsigned.Cert(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lineage, "fullchain.pem"), certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lineage, "privkey.pem"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	group, err := exec.Command("id", "-gn").Output()
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	dest := filepath.Join(work, "tls")
	reloaded := filepath.Join(work, "reloaded")
	hook := func(env ...string) ([]byte, error) {
		cmd := exec.Command("./certbot-deploy-hook.sh")
		cmd.Env = append([]string{
			"PATH=" + os.Getenv("PATH"),
			"PINAKA_TLS_DIR=" + dest,
			"PINAKA_GROUP=" + strings.TrimSpace(string(group)),
			"PINAKA_RELOAD=touch " + reloaded,
		}, env...)
		return cmd.CombinedOutput()
	}

	// Another lineage on the same host is left alone.
	if out, err := hook("RENEWED_LINEAGE="+lineage, "PINAKA_CERT_NAME=other.example"); err != nil {
		t.Fatalf("hook for another lineage: %v\n%s", err, out)
	}
	if _, err := os.Stat(reloaded); err == nil {
		t.Fatal("hook reloaded pinaka for another lineage")
	}

	if out, err := hook("RENEWED_LINEAGE="+lineage, "PINAKA_CERT_NAME=proxy.example"); err != nil {
		t.Fatalf("hook: %v\n%s", err, out)
	}
	if _, err := os.Stat(reloaded); err != nil {
		t.Errorf("hook did not run the reload command: %v", err)
	}
	for name, mode := range map[string]os.FileMode{"fullchain.pem": 0o644, "privkey.pem": 0o640} {
		st, err := os.Stat(filepath.Join(dest, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(dest, "fullchain.pem"), filepath.Join(dest, "privkey.pem")); err != nil {
		t.Errorf("installed pair does not load: %v", err)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dest, ".*.new")); len(leftovers) > 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}

	if out, err := hook(); err == nil || !strings.Contains(string(out), "RENEWED_LINEAGE") {
		t.Errorf("hook without RENEWED_LINEAGE: err %v, output %s", err, out)
	}
}
