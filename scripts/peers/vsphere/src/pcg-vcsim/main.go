// pcg-vcsim: the vCenter simulator (govmomi's vcsim library) that pcg-vsphere's tests run against,
// plus a small reference client on govmomi's view/property packages for cross-checks and the
// benchmark baseline.
//
//	pcg-vcsim [-dc N -cluster N -cluster-host N -host N -vm N -ds N -portgroup N -dir DIR]
//	    [-user U -pass P -idle-timeout D] serves HTTPS on 127.0.0.1:0 and prints, one per line:
//	      PCG_VCSIM_URL=https://127.0.0.1:PORT/sdk
//	      PCG_VCSIM_THUMBPRINT=<SHA-256 of the server certificate, hex>
//	      PCG_VCSIM_CA=<path of the CA certificate (PEM) that signed it>
//	    then serves until SIGINT/SIGTERM. Only -user/-pass (default user / pass) log in. A template named
//	    "pcg-template" is created. A powered-on VM reports a guest IP address after -ip-delay
//	    (as VMware Tools would), and loses it when powered off. RetrievePropertiesEx honours
//	    maxObjects with ContinueRetrievePropertiesEx tokens, as vCenter does (paging.go).
//	    -method-delay METHOD=DURATION (repeatable) answers that method later, as a busy vCenter
//	    would (e.g. CloneVM_Task=4s: a clone that takes a while).
//	pcg-vcsim ref -url URL -ca FILE [-user U -pass P] list|inventory|bench N|power MOREF on|off|destroy MOREF
//	    the reference client: "list" prints every VM as JSON lines (moref, name, power state,
//	    template flag, pcg command id), "inventory" prints every managed entity (type, moref,
//	    name), "bench N" lists every VM N times and prints the median in milliseconds, "power"
//	    powers a VM on or off and "destroy" deletes it (changes made behind pcg's back, for the
//	    watch loop's tests), each printing the VM's moref and what was done.
//	pcg-vcsim ova [-import] [-set key=value ...] FILE.ova
//	    reads an OVA with govmomi's ovf package and prints it as JSON; -import deploys it into an
//	    in-process simulator (ImportVApp + lease upload). See ova.go.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// commandKey is the extraConfig key pcg-vsphere marks its VMs with.
const commandKey = "guestinfo.pcg.command-id"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "ova" {
		if err := ova(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "pcg-vcsim ova:", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "ref" {
		if err := ref(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "pcg-vcsim ref:", err)
			os.Exit(1)
		}
		return
	}
	if err := serve(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "pcg-vcsim:", err)
		os.Exit(1)
	}
}

// pki makes a CA and a server certificate for 127.0.0.1/localhost, writes the CA to dir.
func pki(dir string) (tls.Certificate, string, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	now := time.Now()
	caTpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pcg-vcsim test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDer, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	ca, err := x509.ParseCertificate(caDer)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	tpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	caPath := filepath.Join(dir, "pcg-vcsim-ca.pem")
	if err := os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDer}), 0o644); err != nil {
		return tls.Certificate{}, "", err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, caPath, nil
}

// guestIP plays VMware Tools: a VM that powers on reports an IP address after a delay.
type guestIP struct {
	delay time.Duration
	next  uint32
}

func (g *guestIP) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "PcgGuestIp", Value: "pcg-guest-ip"}
}
func (g *guestIP) PutObject(mo.Reference)                    {}
func (g *guestIP) RemoveObject(types.ManagedObjectReference) {}
func (g *guestIP) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	vm, ok := obj.(*mo.VirtualMachine)
	if !ok {
		return
	}
	for _, c := range changes {
		if c.Name != "runtime.powerState" {
			continue
		}
		ref := vm.Self
		ip := ""
		if c.Val == types.VirtualMachinePowerStatePoweredOn {
			n := atomic.AddUint32(&g.next, 1)
			ip = fmt.Sprintf("10.%d.%d.%d", 100+(n>>16)&0xff, (n>>8)&0xff, n&0xff)
		}
		go func() {
			if ip != "" {
				time.Sleep(g.delay)
			}
			obj := simulator.Map.Get(ref)
			if obj == nil {
				return
			}
			simulator.Map.WithLock(obj, func() {
				simulator.Map.Update(obj, []types.PropertyChange{
					{Name: "guest.ipAddress", Val: ip},
					{Name: "summary.guest.ipAddress", Val: ip},
				})
			})
		}()
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("pcg-vcsim", flag.ExitOnError)
	dc := fs.Int("dc", 1, "datacenters")
	cluster := fs.Int("cluster", 1, "clusters per datacenter")
	clusterHost := fs.Int("cluster-host", 2, "hosts per cluster")
	host := fs.Int("host", 1, "standalone hosts per datacenter")
	vm := fs.Int("vm", 2, "VMs per resource pool (each cluster and standalone host has one)")
	ds := fs.Int("ds", 1, "datastores")
	pg := fs.Int("portgroup", 1, "distributed portgroups per datacenter")
	dir := fs.String("dir", os.TempDir(), "where to write the CA certificate")
	ipDelay := fs.Duration("ip-delay", 300*time.Millisecond, "delay before a powered-on VM reports its IP")
	user := fs.String("user", "user", "the only user name accepted")
	pass := fs.String("pass", "pass", "its password")
	idle := fs.Duration("idle-timeout", 0, "expire sessions idle this long (0: never, the simulator's default)")
	delays := methodDelays{}
	fs.Var(&delays, "method-delay", "METHOD=DURATION: answer METHOD (e.g. CloneVM_Task=3s) that much later, as a busy vCenter would (repeatable)")
	_ = fs.Parse(args)

	simulator.SessionIdleTimeout = *idle
	m := simulator.VPX()
	m.Datacenter = *dc
	m.Cluster = *cluster
	m.ClusterHost = *clusterHost
	m.Host = *host
	m.Machine = *vm
	m.Datastore = *ds
	m.Portgroup = *pg
	m.Autostart = false
	if err := m.Create(); err != nil {
		return err
	}
	defer m.Remove()
	simulator.Map.AddHandler(&guestIP{delay: *ipDelay})
	installPaging()

	cert, caPath, err := pki(*dir)
	if err != nil {
		return err
	}
	m.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *pass)}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	s := m.Service.NewServer()
	defer s.Close()

	if err := makeTemplate(s.URL, caPath, *user, *pass); err != nil {
		return fmt.Errorf("creating the template: %w", err)
	}

	// Delays apply from here on (the template above is made at full speed).
	if len(delays) > 0 {
		m.DelayConfig.MethodDelay = map[string]int(delays)
	}

	sum := sha256.Sum256(cert.Certificate[0])
	u := *s.URL
	u.User = nil
	fmt.Printf("PCG_VCSIM_URL=%s\nPCG_VCSIM_THUMBPRINT=%s\nPCG_VCSIM_CA=%s\n", u.String(), hex.EncodeToString(sum[:]), caPath)
	_ = os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	return nil
}

// methodDelays is the -method-delay flag: METHOD=DURATION pairs, in milliseconds by method name.
type methodDelays map[string]int

func (d methodDelays) String() string { return fmt.Sprint(map[string]int(d)) }

func (d methodDelays) Set(v string) error {
	name, dur, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("want METHOD=DURATION, e.g. CloneVM_Task=3s")
	}
	t, err := time.ParseDuration(dur)
	if err != nil {
		return err
	}
	d[name] = int(t.Milliseconds())
	return nil
}

func connect(ctx context.Context, raw, caPath, user, pass string) (*govmomi.Client, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	u.User = url.UserPassword(user, pass)
	sc := soap.NewClient(u, false)
	if err := sc.SetRootCAs(caPath); err != nil {
		return nil, err
	}
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	c := &govmomi.Client{Client: vc, SessionManager: session.NewManager(vc)}
	if err := c.Login(ctx, u.User); err != nil {
		return nil, err
	}
	return c, nil
}

func makeTemplate(u *url.URL, caPath, user, pass string) error {
	ctx := context.Background()
	c, err := connect(ctx, u.String(), caPath, user, pass)
	if err != nil {
		return err
	}
	defer func() { _ = c.Logout(ctx) }()
	finder := find.NewFinder(c.Client, true)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return err
	}
	dc := dcs[0]
	finder.SetDatacenter(dc)
	vms, err := finder.VirtualMachineList(ctx, "*")
	if err != nil {
		return err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	task, err := vms[0].Clone(ctx, folders.VmFolder, "pcg-template", types.VirtualMachineCloneSpec{Template: true})
	if err != nil {
		return err
	}
	return task.Wait(ctx)
}

// vmRow is one VM as the reference client lists it.
type vmRow struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Power     string `json:"power"`
	Template  bool   `json:"template"`
	CommandID string `json:"command_id,omitempty"`
}

func listVMs(ctx context.Context, c *govmomi.Client) ([]vmRow, error) {
	m := view.NewManager(c.Client)
	v, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, err
	}
	defer func() { _ = v.Destroy(ctx) }()
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"name", "runtime.powerState", "config.template", "config.extraConfig"}, &vms); err != nil {
		return nil, err
	}
	rows := make([]vmRow, 0, len(vms))
	for _, vm := range vms {
		r := vmRow{ID: vm.Self.Value, Name: vm.Name, Power: string(vm.Runtime.PowerState)}
		if vm.Config != nil {
			r.Template = vm.Config.Template
			for _, o := range vm.Config.ExtraConfig {
				if ov := o.GetOptionValue(); ov.Key == commandKey {
					r.CommandID = fmt.Sprint(ov.Value)
				}
			}
		}
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].ID < rows[j].ID })
	return rows, nil
}

func ref(args []string) error {
	fs := flag.NewFlagSet("pcg-vcsim ref", flag.ExitOnError)
	raw := fs.String("url", "", "https://127.0.0.1:PORT/sdk")
	caPath := fs.String("ca", "", "CA certificate (PEM)")
	user := fs.String("user", "user", "user")
	pass := fs.String("pass", "pass", "password")
	_ = fs.Parse(args)
	ctx := context.Background()
	c, err := connect(ctx, *raw, *caPath, *user, *pass)
	if err != nil {
		return err
	}
	defer func() { _ = c.Logout(ctx) }()
	out := json.NewEncoder(os.Stdout)
	switch fs.Arg(0) {
	case "list":
		rows, err := listVMs(ctx, c)
		if err != nil {
			return err
		}
		for _, r := range rows {
			if err := out.Encode(r); err != nil {
				return err
			}
		}
	case "inventory":
		m := view.NewManager(c.Client)
		v, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, nil, true)
		if err != nil {
			return err
		}
		defer func() { _ = v.Destroy(ctx) }()
		var ents []mo.ManagedEntity
		if err := v.Retrieve(ctx, []string{"ManagedEntity"}, []string{"name"}, &ents); err != nil {
			return err
		}
		for _, e := range ents {
			if err := out.Encode(map[string]string{"kind": e.Self.Type, "id": e.Self.Value, "name": e.Name}); err != nil {
				return err
			}
		}
	case "bench":
		n, err := strconv.Atoi(fs.Arg(1))
		if err != nil || n < 1 {
			return fmt.Errorf("bench needs a positive count")
		}
		times := make([]float64, 0, n)
		count := 0
		for i := 0; i < n; i++ {
			start := time.Now()
			rows, err := listVMs(ctx, c)
			if err != nil {
				return err
			}
			count = len(rows)
			times = append(times, float64(time.Since(start).Microseconds())/1000)
		}
		sort.Float64s(times)
		fmt.Printf("{\"vms\":%d,\"runs\":%d,\"median_ms\":%.2f}\n", count, n, times[n/2])
	case "power", "destroy":
		vm := object.NewVirtualMachine(c.Client, types.ManagedObjectReference{Type: "VirtualMachine", Value: fs.Arg(1)})
		var task *object.Task
		switch {
		case fs.Arg(0) == "destroy":
			task, err = vm.Destroy(ctx)
		case fs.Arg(2) == "on":
			task, err = vm.PowerOn(ctx)
		case fs.Arg(2) == "off":
			task, err = vm.PowerOff(ctx)
		default:
			return fmt.Errorf("power needs a moref and on or off")
		}
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return err
		}
		done := fs.Arg(0)
		if done == "power" {
			done = "power " + fs.Arg(2)
		}
		if err := out.Encode(map[string]string{"id": fs.Arg(1), "done": done}); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown ref command %q (list, inventory, bench N, power MOREF on|off, destroy MOREF)", fs.Arg(0))
	}
	return nil
}
