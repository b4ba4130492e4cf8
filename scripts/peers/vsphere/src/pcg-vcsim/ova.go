// ova.go: `pcg-vcsim ova [-import] [-set key=value ...] FILE.ova` reads an OVA the way vSphere's
// clients do, with govmomi's ovf package: it checks the tar layout (descriptor first) and the
// SHA-256 manifest, parses the descriptor, and prints one JSON document describing it (disk,
// transport, hardware, the vApp properties). With -import it also starts an in-process vCenter
// simulator and deploys the OVA there as govc import.ova would: CreateImportSpec (with the -set
// property values), ImportVApp, waiting for the HttpNfcLease, uploading each disk to its lease URL,
// and completing the lease; the result is added under "import".
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/ovf"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type ovaProperty struct {
	Key          string `json:"key"`
	Type         string `json:"type"`
	Label        string `json:"label"`
	Default      string `json:"default"`
	Password     bool   `json:"password"`
	Configurable bool   `json:"user_configurable"`
	Qualifiers   string `json:"qualifiers,omitempty"`
}

type ovaReport struct {
	Files      []string          `json:"files"`
	Manifest   map[string]string `json:"manifest_sha256_ok"`
	Name       string            `json:"name"`
	OSType     string            `json:"os_type"`
	Transport  string            `json:"transport"`
	HwVersion  string            `json:"hardware_version"`
	Devices    []string          `json:"devices"`
	DiskFormat string            `json:"disk_format"`
	DiskBytes  string            `json:"disk_capacity_bytes"`
	Product    string            `json:"product"`
	Version    string            `json:"version"`
	Properties []ovaProperty     `json:"properties"`
	Import     *ovaImport        `json:"import,omitempty"`
}

type ovaImport struct {
	VM            string            `json:"vm"`
	UploadedBytes map[string]int64  `json:"uploaded_bytes"`
	ExtraConfig   map[string]string `json:"extra_config"`
	Warnings      []string          `json:"warnings"`
	GuestID       string            `json:"guest_id"`
	MemoryMB      int32             `json:"memory_mb"`
	NumCPU        int32             `json:"num_cpu"`
}

func str(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func ova(args []string) error {
	fs := flag.NewFlagSet("pcg-vcsim ova", flag.ExitOnError)
	doImport := fs.Bool("import", false, "deploy into an in-process vCenter simulator")
	var sets multiFlag
	fs.Var(&sets, "set", "key=value of a vApp property for the import (repeatable)")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		return fmt.Errorf("usage: pcg-vcsim ova [-import] [-set key=value] FILE.ova")
	}
	path := fs.Arg(0)

	// The tar: the descriptor must come first (OVF 1.x, section 5.3); keep every member.
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	files := map[string][]byte{}
	var order []string
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s is not a tar archive: %w", path, err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return err
		}
		files[h.Name] = b
		order = append(order, h.Name)
	}
	if len(order) == 0 || !strings.HasSuffix(order[0], ".ovf") {
		return fmt.Errorf("the first member of %s is %v, not the .ovf descriptor", path, order)
	}
	rep := ovaReport{Files: order, Manifest: map[string]string{}}

	// The manifest: SHA256(name)= hex, for every file but itself.
	mfName := strings.TrimSuffix(order[0], ".ovf") + ".mf"
	mf, ok := files[mfName]
	if !ok {
		return fmt.Errorf("no manifest %s in %s", mfName, path)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(mf)), "\n") {
		var name, sum string
		if _, err := fmt.Sscanf(strings.Replace(line, ")= ", ") ", 1), "SHA256(%s %s", &name, &sum); err != nil {
			return fmt.Errorf("manifest line %q: %w", line, err)
		}
		name = strings.TrimSuffix(name, ")")
		b, ok := files[name]
		if !ok {
			return fmt.Errorf("the manifest names %s, which is not in the OVA", name)
		}
		got := sha256.Sum256(b)
		if hex.EncodeToString(got[:]) != sum {
			return fmt.Errorf("SHA-256 of %s does not match the manifest", name)
		}
		rep.Manifest[name] = "ok"
	}

	desc := files[order[0]]
	env, err := ovf.Unmarshal(bytes.NewReader(desc))
	if err != nil {
		return fmt.Errorf("govmomi ovf cannot parse %s: %w", order[0], err)
	}
	vs := env.VirtualSystem
	if vs == nil || len(vs.VirtualHardware) == 0 {
		return fmt.Errorf("%s has no VirtualSystem with a VirtualHardwareSection", order[0])
	}
	rep.Name = str(vs.Name)
	if len(vs.OperatingSystem) > 0 {
		rep.OSType = str(vs.OperatingSystem[0].OSType)
	}
	hw := vs.VirtualHardware[0]
	rep.Transport = str(hw.Transport)
	if hw.System != nil {
		rep.HwVersion = str(hw.System.VirtualSystemType)
	}
	for _, it := range hw.Item {
		d := fmt.Sprintf("%d", *it.ResourceType)
		if it.ResourceSubType != nil {
			d += ":" + *it.ResourceSubType
		}
		rep.Devices = append(rep.Devices, d)
	}
	if env.Disk != nil && len(env.Disk.Disks) > 0 {
		rep.DiskFormat = str(env.Disk.Disks[0].Format)
		rep.DiskBytes = env.Disk.Disks[0].Capacity
	}
	for _, ps := range vs.Product {
		rep.Product = ps.Product
		rep.Version = ps.Version
		for _, p := range ps.Property {
			rep.Properties = append(rep.Properties, ovaProperty{
				Key: p.Key, Type: p.Type, Label: str(p.Label), Default: str(p.Default),
				Password: p.Password != nil && *p.Password, Configurable: p.UserConfigurable != nil && *p.UserConfigurable,
				Qualifiers: str(p.Qualifiers),
			})
		}
	}
	if *doImport {
		imp, err := importOva(string(desc), files, sets)
		if err != nil {
			return fmt.Errorf("import into the simulator: %w", err)
		}
		rep.Import = imp
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	return out.Encode(rep)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func importOva(desc string, files map[string][]byte, sets []string) (*ovaImport, error) {
	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 1
	model.Host = 0
	model.Machine = 0
	if err := model.Create(); err != nil {
		return nil, err
	}
	defer model.Remove()
	model.Service.TLS = nil
	s := model.Service.NewServer()
	defer s.Close()

	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, s.URL, true)
	if err != nil {
		return nil, err
	}
	defer func() { _ = c.Logout(ctx) }()
	finder := find.NewFinder(c.Client, true)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	pool, err := finder.DefaultResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	ds, err := finder.DefaultDatastore(ctx)
	if err != nil {
		return nil, err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	var mapping []types.KeyValue
	for _, kv := range sets {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("-set %q: want key=value", kv)
		}
		mapping = append(mapping, types.KeyValue{Key: k, Value: v})
	}
	cisp := types.OvfCreateImportSpecParams{EntityName: "pcg-gateway-import", PropertyMapping: mapping}
	spec, err := ovf.NewManager(c.Client).CreateImportSpec(ctx, desc, pool, ds, cisp)
	if err != nil {
		return nil, err
	}
	if spec.Error != nil {
		return nil, fmt.Errorf("CreateImportSpec: %s", spec.Error[0].LocalizedMessage)
	}
	imp := &ovaImport{UploadedBytes: map[string]int64{}, ExtraConfig: map[string]string{}}
	for _, w := range spec.Warning {
		imp.Warnings = append(imp.Warnings, w.LocalizedMessage)
	}
	lease, err := pool.ImportVApp(ctx, spec.ImportSpec, folders.VmFolder, nil)
	if err != nil {
		return nil, err
	}
	info, err := lease.Wait(ctx, spec.FileItem)
	if err != nil {
		return nil, err
	}
	// The updater drains each item's progress reports (Upload blocks on them otherwise) and
	// keeps the lease alive, as govc does.
	updater := lease.StartUpdater(ctx, info)
	defer updater.Done()
	for _, item := range info.Items {
		b, ok := files[item.Path]
		if !ok {
			return nil, fmt.Errorf("the import spec wants %s, which is not in the OVA", item.Path)
		}
		u := *item.URL
		// The lease names the simulator's own address; it serves plain HTTP here.
		u.Host = s.URL.Host
		u.Scheme = s.URL.Scheme
		item.URL = &u
		cr := &countingReader{r: bytes.NewReader(b)}
		if err := lease.Upload(ctx, item, cr, soap.Upload{ContentLength: int64(len(b))}); err != nil {
			return nil, fmt.Errorf("uploading %s: %w", item.Path, err)
		}
		imp.UploadedBytes[item.Path] = cr.n
	}
	if err := lease.Complete(ctx); err != nil {
		return nil, err
	}
	vm := object.NewVirtualMachine(c.Client, info.Entity)
	var m mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"name", "config"}, &m); err != nil {
		return nil, err
	}
	imp.VM = m.Name + " (" + vm.Reference().Value + ")"
	if m.Config != nil {
		imp.GuestID = m.Config.GuestId
		imp.MemoryMB = m.Config.Hardware.MemoryMB
		imp.NumCPU = m.Config.Hardware.NumCPU
		for _, o := range m.Config.ExtraConfig {
			ov := o.GetOptionValue()
			imp.ExtraConfig[ov.Key] = fmt.Sprint(ov.Value)
		}
	}
	return imp, nil
}
