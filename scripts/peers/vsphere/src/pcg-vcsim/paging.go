// Paging for the simulator's PropertyCollector: govmomi 0.24's vcsim ignores
// RetrieveOptions.maxObjects and has no ContinueRetrievePropertiesEx, while a real vCenter pages
// large results. This wrapper splits a RetrievePropertiesEx result into pages of maxObjects with a
// continuation token, as vCenter does, so clients' paging is exercised for real.
package main

import (
	"fmt"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// pagingPC embeds the simulator's collector by value: vcsim makes a zero-valued copy of the
// registered type for each session, so tokens are per session, as on vCenter.
type pagingPC struct {
	simulator.PropertyCollector
	mu    sync.Mutex
	next  int
	pages map[string]page
}

type page struct {
	rest []types.ObjectContent
	max  int
}

// take stores what does not fit in one page and returns the first page and its token.
func (pc *pagingPC) take(objs []types.ObjectContent, max int) ([]types.ObjectContent, string) {
	if max <= 0 || len(objs) <= max {
		return objs, ""
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.pages == nil {
		pc.pages = map[string]page{}
	}
	pc.next++
	token := fmt.Sprintf("pcg-vcsim-page-%d", pc.next)
	pc.pages[token] = page{rest: objs[max:], max: max}
	return objs[:max], token
}

func (pc *pagingPC) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	body := pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
	b, ok := body.(*methods.RetrievePropertiesExBody)
	if !ok || b.Res == nil || b.Res.Returnval == nil {
		return body
	}
	objs, token := pc.take(b.Res.Returnval.Objects, int(r.Options.MaxObjects))
	b.Res.Returnval.Objects = objs
	b.Res.Returnval.Token = token
	return b
}

func (pc *pagingPC) ContinueRetrievePropertiesEx(ctx *simulator.Context, r *types.ContinueRetrievePropertiesEx) soap.HasFault {
	body := &methods.ContinueRetrievePropertiesExBody{}
	pc.mu.Lock()
	p, ok := pc.pages[r.Token]
	delete(pc.pages, r.Token)
	pc.mu.Unlock()
	if !ok {
		body.Fault_ = simulator.Fault("unknown or used token", &types.InvalidArgument{InvalidProperty: "token"})
		return body
	}
	objs, token := pc.take(p.rest, p.max)
	body.Res = &types.ContinueRetrievePropertiesExResponse{
		Returnval: types.RetrieveResult{Objects: objs, Token: token},
	}
	return body
}

// installPaging replaces the PropertyCollector singleton with the paging wrapper.
func installPaging() {
	ref := types.ManagedObjectReference{Type: "PropertyCollector", Value: "propertyCollector"}
	pc := &pagingPC{}
	pc.Self = ref
	simulator.Map.Put(pc)
}
