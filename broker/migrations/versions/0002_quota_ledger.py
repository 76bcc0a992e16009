"""quota ledger

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 20:58:30.511672
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import broker.core.db

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('resource_class',
    sa.Column('code', sa.String(length=32), nullable=False),
    sa.Column('unit', sa.String(length=16), nullable=False),
    sa.Column('name_zh', sa.String(length=64), nullable=False),
    sa.Column('name_en', sa.String(length=64), nullable=False),
    sa.Column('sort_order', sa.Integer(), nullable=False),
    sa.Column('max_amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('code', name=op.f('pk_resource_class'))
    )
    # the classes every deployment starts with; centers may add more rows
    op.bulk_insert(
        sa.table(
            "resource_class",
            sa.column("code", sa.String()),
            sa.column("unit", sa.String()),
            sa.column("name_zh", sa.String()),
            sa.column("name_en", sa.String()),
            sa.column("sort_order", sa.Integer()),
            sa.column("max_amount", sa.BigInteger()),
        ),
        [
            {"code": "vcpu", "unit": "vCPU", "name_zh": "虚拟CPU", "name_en": "vCPU",
             "sort_order": 10, "max_amount": 10_000_000},
            {"code": "memory_mb", "unit": "MB", "name_zh": "内存", "name_en": "Memory",
             "sort_order": 20, "max_amount": 100_000_000_000},
            {"code": "storage_gb.ssd", "unit": "GB", "name_zh": "SSD存储", "name_en": "SSD storage",
             "sort_order": 30, "max_amount": 10_000_000_000},
            {"code": "storage_gb.hdd", "unit": "GB", "name_zh": "HDD存储", "name_en": "HDD storage",
             "sort_order": 40, "max_amount": 10_000_000_000},
            {"code": "public_ip", "unit": "个", "name_zh": "公网IP", "name_en": "Public IPs",
             "sort_order": 50, "max_amount": 1_000_000},
            {"code": "bandwidth_mbps", "unit": "Mbps", "name_zh": "带宽", "name_en": "Bandwidth",
             "sort_order": 60, "max_amount": 100_000_000},
            {"code": "instances", "unit": "台", "name_zh": "云主机数量", "name_en": "Instances",
             "sort_order": 70, "max_amount": 10_000_000},
        ],
    )
    op.create_table('quota',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('resource_class', sa.String(length=32), nullable=False),
    sa.Column('depth', sa.SmallInteger(), nullable=False),
    sa.Column('hard_limit', sa.BigInteger(), nullable=True),
    sa.Column('valid_from', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('valid_until', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('committed', sa.BigInteger(), nullable=False),
    sa.Column('reserved', sa.BigInteger(), nullable=False),
    sa.Column('created_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint('committed >= 0 AND reserved >= 0', name=op.f('ck_quota_usage_not_negative')),
    sa.CheckConstraint('hard_limit IS NULL OR hard_limit >= 0', name=op.f('ck_quota_limit_not_negative')),
    sa.CheckConstraint('valid_until IS NULL OR valid_until > valid_from', name=op.f('ck_quota_window')),
    sa.ForeignKeyConstraint(['resource_class'], ['resource_class.code'], name=op.f('fk_quota_resource_class_resource_class')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_quota_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quota')),
    sa.UniqueConstraint('tenant_id', 'resource_class', name=op.f('uq_quota_tenant_id_resource_class'))
    )
    with op.batch_alter_table('quota', schema=None) as batch_op:
        batch_op.create_index('ix_quota_depth_resource_class', ['depth', 'resource_class'], unique=False)

    op.create_table('quota_request',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('state', sa.String(length=24), nullable=False),
    sa.Column('requested', sa.JSON(), nullable=False),
    sa.Column('approved', sa.JSON(), nullable=True),
    sa.Column('justification', sa.String(length=2000), nullable=False),
    sa.Column('decision_reason', sa.String(length=2000), nullable=True),
    sa.Column('requested_by', sa.Uuid(), nullable=True),
    sa.Column('decided_by', sa.Uuid(), nullable=True),
    sa.Column('created_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('decided_at', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('attachment_name', sa.String(length=255), nullable=True),
    sa.Column('attachment_type', sa.String(length=100), nullable=True),
    sa.Column('attachment_size', sa.Integer(), nullable=True),
    sa.Column('attachment_sha256', sa.String(length=64), nullable=True),
    sa.CheckConstraint("state IN ('pending','approved','partially_approved','rejected','withdrawn')", name=op.f('ck_quota_request_state')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_quota_request_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quota_request'))
    )
    with op.batch_alter_table('quota_request', schema=None) as batch_op:
        batch_op.create_index('ix_quota_request_state_created_at', ['state', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_quota_request_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('reservation',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('ref', sa.String(length=128), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('agency_id', sa.Uuid(), nullable=False),
    sa.Column('owner_ref', sa.String(length=128), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('expires_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('settled_at', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.CheckConstraint("state IN ('reserved','committed','released')", name=op.f('ck_reservation_state')),
    sa.ForeignKeyConstraint(['agency_id'], ['tenant.id'], name=op.f('fk_reservation_agency_id_tenant')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_reservation_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reservation')),
    sa.UniqueConstraint('ref', name=op.f('uq_reservation_ref'))
    )
    with op.batch_alter_table('reservation', schema=None) as batch_op:
        batch_op.create_index('ix_reservation_state_expires_at', ['state', 'expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_reservation_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('allocation',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('reservation_id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('agency_id', sa.Uuid(), nullable=False),
    sa.Column('resource_class', sa.String(length=32), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('owner_ref', sa.String(length=128), nullable=True),
    sa.Column('expires_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('committed_at', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('released_at', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('reserved','committed','released')", name=op.f('ck_allocation_state')),
    sa.ForeignKeyConstraint(['agency_id'], ['tenant.id'], name=op.f('fk_allocation_agency_id_tenant')),
    sa.ForeignKeyConstraint(['reservation_id'], ['reservation.id'], name=op.f('fk_allocation_reservation_id_reservation')),
    sa.ForeignKeyConstraint(['resource_class'], ['resource_class.code'], name=op.f('fk_allocation_resource_class_resource_class')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_allocation_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_allocation'))
    )
    with op.batch_alter_table('allocation', schema=None) as batch_op:
        batch_op.create_index('ix_allocation_agency_id_state_resource_class', ['agency_id', 'state', 'resource_class'], unique=False)
        batch_op.create_index('ix_allocation_owner_ref_state', ['owner_ref', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_allocation_reservation_id'), ['reservation_id'], unique=False)

    op.create_table('quota_notice',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('quota_id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('resource_class', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('valid_until', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', broker.core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', broker.core.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['quota_id'], ['quota.id'], name=op.f('fk_quota_notice_quota_id_quota'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_quota_notice_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quota_notice')),
    sa.UniqueConstraint('quota_id', 'kind', 'valid_until', name=op.f('uq_quota_notice_quota_id_kind_valid_until'))
    )
    with op.batch_alter_table('quota_notice', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_quota_notice_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('quota_request_attachment',
    sa.Column('request_id', sa.Uuid(), nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['quota_request.id'], name=op.f('fk_quota_request_attachment_request_id_quota_request'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_quota_request_attachment'))
    )


def downgrade() -> None:
    op.drop_table('quota_request_attachment')
    with op.batch_alter_table('quota_notice', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_quota_notice_tenant_id'))

    op.drop_table('quota_notice')
    with op.batch_alter_table('allocation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_allocation_reservation_id'))
        batch_op.drop_index('ix_allocation_owner_ref_state')
        batch_op.drop_index('ix_allocation_agency_id_state_resource_class')

    op.drop_table('allocation')
    with op.batch_alter_table('reservation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reservation_tenant_id'))
        batch_op.drop_index('ix_reservation_state_expires_at')

    op.drop_table('reservation')
    with op.batch_alter_table('quota_request', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_quota_request_tenant_id'))
        batch_op.drop_index('ix_quota_request_state_created_at')

    op.drop_table('quota_request')
    with op.batch_alter_table('quota', schema=None) as batch_op:
        batch_op.drop_index('ix_quota_depth_resource_class')

    op.drop_table('quota')
    op.drop_table('resource_class')
