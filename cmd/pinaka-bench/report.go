package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// Report is the output of one pinaka-bench run: every workload against one
// target (a proxy over one protocol, or the direct baseline).
type Report struct {
	Label    string   `json:"label"`
	Proxy    string   `json:"proxy,omitempty"`
	Protocol string   `json:"protocol"` // protoDirect, protoH1, protoH2 or protoH3
	Duration string   `json:"duration"` // per measurement
	Results  []Result `json:"results"`
}

const (
	protoDirect = "direct"
	protoH1     = "HTTP/1.1"
	protoH2     = "HTTP/2"
)

// baselineOf names the direct workload that workload w is compared with.
// Tunnel setup on a warm HTTP/2 connection is still compared with a full
// TCP+TLS setup to the origin: that is what a client without the proxy pays.
// Memory has no baseline.
func baselineOf(w string) string {
	switch w {
	case wSetupWarm:
		return wSetup
	case wMemory:
		return ""
	}
	return w
}

// targetKind says how a row's target is checked.
type targetKind int

const (
	noTarget      targetKind = iota
	minRatio                 // ratio to the direct baseline >= v
	minValue                 // absolute value >= v
	maxValue                 // absolute value <= v
	minSquidValue            // at least the Squid column's figure
)

type target struct {
	kind targetKind
	v    float64
}

// format renders the target for a row whose values are in unit.
func (t target) format(unit string) string {
	switch t.kind {
	case minRatio:
		return fmt.Sprintf("≥%.2f×", t.v)
	case minValue:
		return "≥" + formatValue(t.v, unit)
	case maxValue:
		return "≤" + formatValue(t.v, unit)
	case minSquidValue:
		return "≥ " + squidLabel
	}
	return ""
}

// met reports whether a cell meets the target; ok is false when the target
// cannot be checked (no target, or the figure it depends on is missing).
// squid is the Squid cell of the same row, compared by ratio when both
// have one (each to its own adjacent baseline), else by value.
func (t target) met(value float64, r *float64, squid *Result) (met, ok bool) {
	switch t.kind {
	case minRatio:
		if r == nil {
			return false, false
		}
		return *r >= t.v, true
	case minValue:
		return value >= t.v, true
	case maxValue:
		return value <= t.v, true
	case minSquidValue:
		if squid == nil {
			return false, false
		}
		if r != nil && squid.Ratio != nil {
			return *r >= *squid.Ratio, true
		}
		return value >= squid.Value, true
	}
	return false, false
}

// row is one line of the results table.
type row struct {
	proto, workload string
	title           string // %d is replaced by the result's N
	target          target
}

// squidLabel is the column the "≥ Squid" target compares with.
const squidLabel = "Squid"

// tableRows fixes the order and wording of the table and the targets from
// the performance issue.
var tableRows = []row{
	{protoH1, wDown1, "HTTP/1.1 CONNECT, 1 tunnel, download", target{minRatio, 0.60}},
	{protoH1, wUp1, "HTTP/1.1 CONNECT, 1 tunnel, upload", target{minRatio, 0.55}},
	{protoH1, wDownN, "HTTP/1.1 CONNECT, %d tunnels, download", target{}},
	{protoH1, wUpN, "HTTP/1.1 CONNECT, %d tunnels, upload", target{}},
	{protoH2, wDown1, "HTTP/2 CONNECT, 1 tunnel, download", target{minRatio, 0.40}},
	{protoH2, wUp1, "HTTP/2 CONNECT, 1 tunnel, upload", target{minRatio, 0.40}},
	{protoH2, wDownN, "HTTP/2 CONNECT, %d tunnels on one connection, download", target{minRatio, 0.40}},
	{protoH2, wUpN, "HTTP/2 CONNECT, %d tunnels on one connection, upload", target{minRatio, 0.40}},
	{protoH3, wDown1, "HTTP/3 CONNECT, 1 tunnel, download", target{}},
	{protoH3, wUp1, "HTTP/3 CONNECT, 1 tunnel, upload", target{}},
	{protoH3, wDownN, "HTTP/3 CONNECT, %d tunnels on one connection, download", target{}},
	{protoH3, wUpN, "HTTP/3 CONNECT, %d tunnels on one connection, upload", target{}},
	{protoH1, wSetup, "HTTP/1.1 tunnel setup, new TLS connection + CONNECT, %d workers", target{minSquidValue, 0}},
	{protoH2, wSetup, "HTTP/2 tunnel setup, new TLS connection + CONNECT stream, %d workers", target{}},
	{protoH2, wSetupWarm, "HTTP/2 tunnel setup, CONNECT streams on one warm connection, %d workers", target{minValue, 8000}},
	{protoH1, wForward, "HTTP/1.1 plain forwarding, %d keep-alive clients, 1 KB", target{minRatio, 0.30}},
	{protoH2, wForward, "HTTP/2 plain forwarding, %d streams on one connection, 1 KB", target{minRatio, 0.25}},
	{protoH1, wMemory, "HTTP/1.1 proxy memory per idle tunnel (%d tunnels)", target{maxValue, 24}},
	{protoH2, wMemory, "HTTP/2 proxy memory per idle tunnel stream (%d streams)", target{maxValue, 12}},
	{protoH3, wUDP, "HTTP/3 CONNECT-UDP, %d flows on one connection, 1000-byte datagrams echoed (both ways counted)", target{}},
}

// writeTable renders reports as one markdown table: a row per protocol and
// workload, a column for the direct baseline and one per proxy label
// (reports with the same label, e.g. its HTTP/1.1 and HTTP/2 runs, share a
// column). A result's own ratio (-baseline) is shown when it has one;
// otherwise the ratio is to the direct report given in the same call.
func writeTable(w io.Writer, reports []Report) error {
	g := groupReports(reports)
	direct, labels, cells := g.direct, g.labels, g.cells

	var b strings.Builder
	b.WriteString("| workload | target | direct |")
	for _, l := range labels {
		fmt.Fprintf(&b, " %s |", l)
	}
	b.WriteString("\n|---|---|---|")
	b.WriteString(strings.Repeat("---|", len(labels)))
	b.WriteString("\n")

	for _, row := range tableRows {
		key := row.proto + "/" + row.workload
		n, unit, present := 0, "", false
		for _, l := range labels {
			if r, ok := cells[l][key]; ok {
				n, unit, present = r.N, r.Unit, true
				break
			}
		}
		if !present {
			continue
		}
		title := row.title
		if strings.Contains(title, "%d") {
			title = fmt.Sprintf(title, n)
		}
		var base *Result
		if bw := baselineOf(row.workload); bw != "" {
			if r, ok := direct[bw]; ok {
				base = &r
			}
		}
		fmt.Fprintf(&b, "| %s | %s | ", title, row.target.format(unit))
		if base != nil {
			b.WriteString(formatCell(*base, nil, ""))
		} else {
			b.WriteString("—")
		}
		b.WriteString(" |")
		var squid *Result
		if r, ok := cells[squidLabel][key]; ok && r.Error == "" {
			squid = &r
		}
		for _, l := range labels {
			r, ok := cells[l][key]
			if !ok {
				b.WriteString(" n/a |")
				continue
			}
			// A ratio to a baseline measured right before the figure (in
			// the same pinaka-bench invocation) beats one to the direct
			// column measured minutes earlier: on a shared machine the
			// load from elsewhere changes in between.
			rat := r.Ratio
			if rat == nil && base != nil && base.Error == "" && r.Error == "" {
				rat = ratio(r.Value, base.Value)
			}
			mark := ""
			// A column is not compared with itself.
			if r.Error == "" && !(row.target.kind == minSquidValue && l == squidLabel) {
				if met, ok := row.target.met(r.Value, rat, squid); ok {
					mark = map[bool]string{true: " ✓", false: " ✗"}[met]
				}
			}
			fmt.Fprintf(&b, " %s |", formatCell(r, rat, mark))
		}
		b.WriteString("\n")
	}
	writeCPUTable(&b, g)
	_, err := io.WriteString(w, b.String())
	return err
}

// grouped is the reports of one table: the direct baseline's results by
// workload, and every proxy's by label (reports with the same label, e.g.
// its HTTP/1.1 and HTTP/2 runs, share a column) and protocol/workload.
type grouped struct {
	direct map[string]Result
	labels []string
	cells  map[string]map[string]Result
}

func groupReports(reports []Report) grouped {
	g := grouped{direct: map[string]Result{}, cells: map[string]map[string]Result{}}
	for _, rep := range reports {
		if rep.Protocol == protoDirect {
			for _, r := range rep.Results {
				if _, dup := g.direct[r.Workload]; !dup {
					g.direct[r.Workload] = r
				}
			}
			continue
		}
		if !slices.Contains(g.labels, rep.Label) {
			g.labels = append(g.labels, rep.Label)
			g.cells[rep.Label] = map[string]Result{}
		}
		for _, r := range rep.Results {
			g.cells[rep.Label][rep.Protocol+"/"+r.Workload] = r
		}
	}
	return g
}

// writeCPUTable appends, when the reports carry CPU figures, a second
// table with what each workload cost per unit of work: the proxy's CPU and
// pinaka-bench's own (clients and origins; for the direct column, all there
// is). Nothing is written when no result has them.
func writeCPUTable(b *strings.Builder, g grouped) {
	var rows strings.Builder
	for _, row := range tableRows {
		if row.workload == wMemory {
			continue
		}
		key := row.proto + "/" + row.workload
		title, unit, has := "", "", false
		for _, l := range g.labels {
			if r, ok := g.cells[l][key]; ok {
				title = row.title
				if strings.Contains(title, "%d") {
					title = fmt.Sprintf(title, r.N)
				}
				if r.CPUUnit != "" {
					unit, has = r.CPUUnit, true
				}
			}
		}
		if !has {
			continue
		}
		fmt.Fprintf(&rows, "| %s | %s | ", title, unit)
		if r, ok := g.direct[baselineOf(row.workload)]; ok && r.BenchCPU != nil {
			rows.WriteString(formatNumber(*r.BenchCPU))
		} else {
			rows.WriteString("—")
		}
		rows.WriteString(" |")
		for _, l := range g.labels {
			r, ok := g.cells[l][key]
			if !ok || (r.ProxyCPU == nil && r.BenchCPU == nil) {
				rows.WriteString(" n/a |")
				continue
			}
			fmt.Fprintf(&rows, " %s + %s |", formatCPU(r.ProxyCPU), formatCPU(r.BenchCPU))
		}
		rows.WriteString("\n")
	}
	if rows.Len() == 0 {
		return
	}
	b.WriteString("\nCPU per unit of work, proxy + pinaka-bench (clients and origins); the direct\n")
	b.WriteString("column is pinaka-bench alone. Lower is better; unlike throughput, it barely\n")
	b.WriteString("moves with load from elsewhere on the machine.\n\n")
	b.WriteString("| workload | unit | direct |")
	for _, l := range g.labels {
		fmt.Fprintf(b, " %s |", l)
	}
	b.WriteString("\n|---|---|---|")
	b.WriteString(strings.Repeat("---|", len(g.labels)))
	b.WriteString("\n")
	b.WriteString(rows.String())
}

func formatCPU(v *float64) string {
	if v == nil {
		return "?"
	}
	return formatNumber(*v)
}

// formatCell renders a result as "value (ratio×)", with latency percentiles
// for rate workloads and the error when the workload failed.
func formatCell(r Result, rat *float64, mark string) string {
	if r.Error != "" && r.Value == 0 {
		return "error: " + shorten(r.Error, 80)
	}
	var s strings.Builder
	s.WriteString(formatValue(r.Value, r.Unit))
	if rat != nil {
		fmt.Fprintf(&s, " (%.2f×)", *rat)
	}
	s.WriteString(mark)
	if r.P50Ms > 0 || r.P99Ms > 0 {
		fmt.Fprintf(&s, "<br>p50 %.2f ms, p99 %.2f ms", r.P50Ms, r.P99Ms)
	}
	if r.Error != "" {
		s.WriteString("<br>error: " + shorten(r.Error, 80))
	}
	return s.String()
}

func formatValue(v float64, unit string) string {
	switch unit {
	case "KB/tunnel":
		return formatNumber(v) + " KB"
	case "tunnels/s":
		return formatNumber(v) + "/s"
	}
	return formatNumber(v) + " " + unit
}

// formatNumber prints large figures without spurious precision.
func formatNumber(v float64) string {
	if v >= 100 || v <= -100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func shorten(s string, n int) string {
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// writeText prints one report for a terminal.
func writeText(w io.Writer, rep Report) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (%s", rep.Label, rep.Protocol)
	if rep.Proxy != "" {
		fmt.Fprintf(&b, " via %s", rep.Proxy)
	}
	fmt.Fprintf(&b, ", %s per measurement)\n", rep.Duration)
	for _, r := range rep.Results {
		fmt.Fprintf(&b, "  %-10s n=%-5d %s", r.Workload, r.N, formatText(r))
		if r.Baseline != nil {
			fmt.Fprintf(&b, "  baseline %s", formatValue(*r.Baseline, r.Unit))
		}
		if r.Ratio != nil {
			fmt.Fprintf(&b, "  ratio %.2f×", *r.Ratio)
		}
		switch {
		case r.CPUUnit == "":
		case r.ProxyCPU == nil:
			fmt.Fprintf(&b, "  cpu bench %s %s", formatCPU(r.BenchCPU), r.CPUUnit)
		default:
			fmt.Fprintf(&b, "  cpu proxy %s + bench %s %s", formatCPU(r.ProxyCPU), formatCPU(r.BenchCPU), r.CPUUnit)
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func formatText(r Result) string {
	s := formatValue(r.Value, r.Unit)
	if r.P50Ms > 0 || r.P99Ms > 0 {
		s += fmt.Sprintf(" (p50 %.2f ms, p99 %.2f ms)", r.P50Ms, r.P99Ms)
	}
	if r.Error != "" {
		s += "  error: " + r.Error
	}
	return s
}
