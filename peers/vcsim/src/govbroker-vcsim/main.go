// Command govbroker-vcsim serves a govmomi vCenter simulator (vcsim) model for govbroker's tests.
//
// Debian packages govmomi's simulator as Go source without a vcsim binary, so this small main
// builds a VPX model from flags, adds what govbroker's VMware driver needs (templates to clone,
// one IP pool per VM network), serves it, and prints on stdout:
//
//	url=<service URL with user info>
//	template=<name> <moref>      (one line per template)
//	ippool=<id> <network> <cidr> (one line per IP pool)
//	ready vms=<count>
//
// It runs until SIGTERM or SIGINT, then closes the server and removes the model's temporary
// datastore directories (which live in $TMPDIR).
//
// Two behaviours of govmomi 0.24's simulator are brought closer to a real vCenter, because the
// driver's tests depend on them (see "vCenter fidelity patches" below):
//   - RetrievePropertiesEx ignores RetrieveOptions.maxObjects and never pages; here the root
//     PropertyCollector pages, so ContinueRetrievePropertiesEx is exercised as on vCenter.
//   - Uplink portgroups of a distributed switch lack config.uplink=true; here they get it.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type options struct {
	datacenters    int
	clusters       int
	clusterHosts   int
	standalone     int
	machines       int
	datastores     int
	portgroups     int
	listen         string
	username       string
	password       string
	useTLS         bool
	templates      string
	templateFolder string
	templateDiskGB int
	templateGuest  string
	ipPools        bool
	paging         bool
	verbose        bool
}

func parseFlags() options {
	var o options
	flag.IntVar(&o.datacenters, "dc", 1, "datacenters")
	flag.IntVar(&o.clusters, "cluster", 1, "clusters per datacenter")
	flag.IntVar(&o.clusterHosts, "host", 3, "hosts per cluster")
	flag.IntVar(&o.standalone, "standalone-host", 1, "standalone hosts per datacenter")
	flag.IntVar(&o.machines, "vm", 2, "VMs per standalone host and per cluster")
	flag.IntVar(&o.datastores, "ds", 2, "local datastores per datacenter (mounted on every host)")
	flag.IntVar(&o.portgroups, "pg", 1, "distributed portgroups per datacenter")
	flag.StringVar(&o.listen, "listen", "127.0.0.1:0", "address to listen on (port 0 picks one)")
	flag.StringVar(&o.username, "username", "", "the only accepted user (default: any non-empty)")
	flag.StringVar(&o.password, "password", "", "the only accepted password (with -username)")
	flag.BoolVar(&o.useTLS, "tls", false, "serve https with a self-signed certificate")
	flag.StringVar(&o.templates, "template", "", "comma-separated names of template VMs to create in the first datacenter")
	flag.StringVar(&o.templateFolder, "template-folder", "templates", "vm folder (under the datacenter's vmFolder) for the templates")
	flag.IntVar(&o.templateDiskGB, "template-disk-gb", 10, "root disk size of each template")
	flag.StringVar(&o.templateGuest, "template-guest", "centos7_64Guest", "guest OS id of the templates")
	flag.BoolVar(&o.ipPools, "ip-pools", true, "create one IP pool per VM network, associated with it")
	flag.BoolVar(&o.paging, "paging", true, "honour RetrieveOptions.maxObjects with ContinueRetrievePropertiesEx")
	flag.BoolVar(&o.verbose, "verbose", false, "keep the simulator's own log on stderr")
	flag.Parse()
	return o
}

func main() {
	o := parseFlags()
	// Catch the signals before anything is printed: a fixture may stop the peer as soon as it
	// reads the ready line, and the default action would skip the datastore cleanup.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	if !o.verbose {
		// The simulator logs every WaitForUpdates tick; with thousands of VMs that drowns the
		// fixture's stderr file, which is kept for start-up failures.
		log.SetOutput(ioutil.Discard)
	}
	if (o.username == "") != (o.password == "") {
		fail("-username and -password go together")
	}

	m := simulator.VPX()
	m.Datacenter = o.datacenters
	m.Cluster = o.clusters
	m.ClusterHost = o.clusterHosts
	m.Host = o.standalone
	m.Machine = o.machines
	m.Datastore = o.datastores
	m.Portgroup = o.portgroups
	if err := m.Create(); err != nil {
		m.Remove()
		fail("create model: %v", err)
	}

	markUplinks()
	if o.paging {
		installPagingCollector(m)
	}

	ctx := context.Background()
	client, err := vim25.NewClient(ctx, m.Service)
	if err != nil {
		fail("in-process client: %v", err)
	}
	templates, err := createTemplates(ctx, client, o)
	if err != nil {
		m.Remove()
		fail("templates: %v", err)
	}
	var pools []string
	if o.ipPools {
		if pools, err = createIPPools(ctx, client); err != nil {
			m.Remove()
			fail("ip pools: %v", err)
		}
	}

	m.Service.Listen = &url.URL{Host: o.listen}
	if o.username != "" {
		m.Service.Listen.User = url.UserPassword(o.username, o.password)
	}
	if o.useTLS {
		m.Service.TLS = new(tls.Config)
	}
	server, err := serve(m)
	if err != nil {
		m.Remove()
		fail("serve on %s: %v", o.listen, err)
	}

	fmt.Printf("url=%s\n", server.URL)
	for _, line := range templates {
		fmt.Printf("template=%s\n", line)
	}
	for _, line := range pools {
		fmt.Printf("ippool=%s\n", line)
	}
	fmt.Printf("ready vms=%d\n", len(simulator.Map.All("VirtualMachine")))

	<-stop

	// Close waits for in-flight requests; a client blocked in WaitForUpdatesEx must not keep
	// the process (and its datastore directories) alive for long.
	closed := make(chan struct{})
	go func() {
		server.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
	}
	m.Remove()
}

// serve starts the server; the simulator panics when it cannot listen, which would skip the
// datastore cleanup.
func serve(m *simulator.Model) (server *simulator.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	return m.Service.NewServer(), nil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "govbroker-vcsim: "+format+"\n", args...)
	os.Exit(1)
}

// --- model additions ------------------------------------------------------------------------

// createTemplates adds powered-off template VMs (a root disk on the first datastore and one NIC
// on the first VM network) to the first datacenter, in their own folder.
func createTemplates(ctx context.Context, c *vim25.Client, o options) ([]string, error) {
	var names []string
	for _, n := range strings.Split(o.templates, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return nil, nil
	}

	finder := find.NewFinder(c, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(dcs, func(i, j int) bool { return dcs[i].Name() < dcs[j].Name() })
	dc := dcs[0]
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	folder := folders.VmFolder
	if o.templateFolder != "" {
		if folder, err = folders.VmFolder.CreateFolder(ctx, o.templateFolder); err != nil {
			return nil, err
		}
	}

	pool, err := firstResourcePool(ctx, finder)
	if err != nil {
		return nil, err
	}
	datastores, err := finder.DatastoreList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(datastores, func(i, j int) bool { return datastores[i].Name() < datastores[j].Name() })
	datastore := datastores[0]
	network, err := firstVMNetwork(ctx, finder)
	if err != nil {
		return nil, err
	}
	backing, err := network.EthernetCardBackingInfo(ctx)
	if err != nil {
		return nil, err
	}

	var lines []string
	for _, name := range names {
		var devices object.VirtualDeviceList
		scsi, err := devices.CreateSCSIController("pvscsi")
		if err != nil {
			return nil, err
		}
		devices = append(devices, scsi)
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), datastore.Reference(),
			fmt.Sprintf("[%s] %s/%s.vmdk", datastore.Name(), name, name))
		disk.CapacityInKB = int64(o.templateDiskGB) * 1024 * 1024
		nic, err := devices.CreateEthernetCard("vmxnet3", backing)
		if err != nil {
			return nil, err
		}
		devices = append(devices, disk, nic)
		changes, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
		if err != nil {
			return nil, err
		}
		spec := types.VirtualMachineConfigSpec{
			Name:         name,
			GuestId:      o.templateGuest,
			NumCPUs:      1,
			MemoryMB:     1024,
			Files:        &types.VirtualMachineFileInfo{VmPathName: "[" + datastore.Name() + "]"},
			DeviceChange: changes,
		}
		task, err := folder.CreateVM(ctx, spec, pool, nil)
		if err != nil {
			return nil, err
		}
		info, err := task.WaitForResult(ctx, nil)
		if err != nil {
			return nil, err
		}
		ref := info.Result.(types.ManagedObjectReference)
		if err := object.NewVirtualMachine(c, ref).MarkAsTemplate(ctx); err != nil {
			return nil, err
		}
		lines = append(lines, name+" "+ref.Value)
	}
	return lines, nil
}

func firstResourcePool(ctx context.Context, finder *find.Finder) (*object.ResourcePool, error) {
	clusters, err := finder.ClusterComputeResourceList(ctx, "*")
	if err == nil && len(clusters) > 0 {
		sort.Slice(clusters, func(i, j int) bool { return clusters[i].Name() < clusters[j].Name() })
		return clusters[0].ResourcePool(ctx)
	}
	computes, err := finder.ComputeResourceList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(computes, func(i, j int) bool { return computes[i].Name() < computes[j].Name() })
	return computes[0].ResourcePool(ctx)
}

// vmNetworks lists the networks a VM NIC can use: standard networks and distributed
// portgroups, without the distributed switches' uplink portgroups.
func vmNetworks(ctx context.Context, finder *find.Finder) ([]object.NetworkReference, error) {
	all, err := finder.NetworkList(ctx, "*")
	if err != nil {
		return nil, err
	}
	var nets []object.NetworkReference
	for _, n := range all {
		switch n.Reference().Type {
		case "Network", "DistributedVirtualPortgroup":
			if !strings.Contains(path.Base(n.GetInventoryPath()), "-DVUplinks") {
				nets = append(nets, n)
			}
		}
	}
	sort.Slice(nets, func(i, j int) bool {
		return path.Base(nets[i].GetInventoryPath()) < path.Base(nets[j].GetInventoryPath())
	})
	return nets, nil
}

func firstVMNetwork(ctx context.Context, finder *find.Finder) (object.NetworkReference, error) {
	nets, err := vmNetworks(ctx, finder)
	if err != nil {
		return nil, err
	}
	if len(nets) == 0 {
		return nil, fmt.Errorf("no VM network")
	}
	return nets[0], nil
}

// createIPPools gives every VM network of every datacenter its own IPv4 pool (10.100.0.0/24,
// 10.101.0.0/24, ...), as a vCenter administrator would for networks whose VMs get fixed
// addresses through guest customization.
func createIPPools(ctx context.Context, c *vim25.Client) ([]string, error) {
	finder := find.NewFinder(c, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return nil, err
	}
	sort.Slice(dcs, func(i, j int) bool { return dcs[i].Name() < dcs[j].Name() })
	var lines []string
	subnet := 100
	for _, dc := range dcs {
		finder.SetDatacenter(dc)
		nets, err := vmNetworks(ctx, finder)
		if err != nil {
			return nil, err
		}
		for _, n := range nets {
			if subnet > 255 {
				return lines, nil
			}
			ref := n.Reference()
			name := path.Base(n.GetInventoryPath())
			prefix := "10." + strconv.Itoa(subnet) + ".0."
			// The simulator stores the requested pool as-is and so reports whatever id it
			// carries; vCenter assigns ids itself. Ask for the id the simulator will assign
			// (its own pool is 1, ours follow) so QueryIpPools reports real ids.
			id := int32(len(lines) + 2)
			req := types.CreateIpPool{
				This: *c.ServiceContent.IpPoolManager,
				Dc:   dc.Reference(),
				Pool: types.IpPool{
					Id:   id,
					Name: "govbroker-" + name,
					Ipv4Config: &types.IpPoolIpPoolConfigInfo{
						SubnetAddress: prefix + "0",
						Netmask:       "255.255.255.0",
						Gateway:       prefix + "1",
						Range:         prefix + "10#200",
						Dns:           []string{prefix + "2"},
						IpPoolEnabled: types.NewBool(true),
					},
					NetworkAssociation: []types.IpPoolAssociation{{Network: &ref, NetworkName: name}},
				},
			}
			res, err := methods.CreateIpPool(ctx, c, &req)
			if err != nil {
				return nil, err
			}
			if res.Returnval != id {
				return nil, fmt.Errorf("ip pool %s got id %d, expected %d", name, res.Returnval, id)
			}
			lines = append(lines, fmt.Sprintf("%d %s %s0/24", res.Returnval, ref.Value, prefix))
			subnet++
		}
	}
	return lines, nil
}

// --- vCenter fidelity patches ---------------------------------------------------------------

// markUplinks sets config.uplink on the uplink portgroups the simulator creates with every
// distributed switch, as vCenter does, so clients can leave them out of VM network lists.
func markUplinks() {
	for _, e := range simulator.Map.All("DistributedVirtualPortgroup") {
		pg, ok := e.(*simulator.DistributedVirtualPortgroup)
		if ok && strings.Contains(pg.Name, "-DVUplinks") {
			pg.Config.Uplink = types.NewBool(true)
		}
	}
}

// pagingCollector is the root PropertyCollector with vCenter's paging: a RetrievePropertiesEx
// whose options set maxObjects returns at most that many objects and a token, and
// ContinueRetrievePropertiesEx hands out the rest page by page. The simulator creates one
// instance per session by reflection, so the zero value must work and the embedded collector
// must be the first field (the simulator finds the managed object type through field 0).
type pagingCollector struct {
	simulator.PropertyCollector

	pagesMu sync.Mutex
	pages   map[string]pendingPages
	next    int
}

// pendingPages is what a token stands for: the objects not yet returned, and the page size of
// the request that started the retrieval (vCenter keeps it for every continuation).
type pendingPages struct {
	rest []types.ObjectContent
	size int
}

func installPagingCollector(m *simulator.Model) {
	pc := &pagingCollector{}
	pc.Self = m.ServiceContent.PropertyCollector
	simulator.Map.Put(pc)
}

func (pc *pagingCollector) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
	body, ok := res.(*methods.RetrievePropertiesExBody)
	if !ok || body.Fault_ != nil || body.Res == nil || body.Res.Returnval == nil {
		return res
	}
	pc.page(body.Res.Returnval, int(r.Options.MaxObjects))
	return res
}

// page cuts result down to one page of size objects and keeps the rest under a new token.
func (pc *pagingCollector) page(result *types.RetrieveResult, size int) {
	if size <= 0 || len(result.Objects) <= size {
		return
	}
	pc.pagesMu.Lock()
	defer pc.pagesMu.Unlock()
	if pc.pages == nil {
		pc.pages = make(map[string]pendingPages)
	}
	pc.next++
	result.Token = "page-" + strconv.Itoa(pc.next)
	pc.pages[result.Token] = pendingPages{rest: result.Objects[size:], size: size}
	result.Objects = result.Objects[:size]
}

func (pc *pagingCollector) ContinueRetrievePropertiesEx(ctx *simulator.Context, r *types.ContinueRetrievePropertiesEx) soap.HasFault {
	body := &methods.ContinueRetrievePropertiesExBody{}
	pc.pagesMu.Lock()
	pending, ok := pc.pages[r.Token]
	delete(pc.pages, r.Token)
	pc.pagesMu.Unlock()
	if !ok {
		body.Fault_ = simulator.Fault("unknown or finished token "+r.Token,
			&types.InvalidArgument{InvalidProperty: "token"})
		return body
	}
	result := types.RetrieveResult{Objects: pending.rest}
	pc.page(&result, pending.size)
	body.Res = &types.ContinueRetrievePropertiesExResponse{Returnval: result}
	return body
}

func (pc *pagingCollector) CancelRetrievePropertiesEx(ctx *simulator.Context, r *types.CancelRetrievePropertiesEx) soap.HasFault {
	pc.pagesMu.Lock()
	delete(pc.pages, r.Token)
	pc.pagesMu.Unlock()
	return &methods.CancelRetrievePropertiesExBody{Res: new(types.CancelRetrievePropertiesExResponse)}
}
