"""issue 13b: one checkpoint per job, and the attempt token that guards every write of an attempt

A checkpoint now holds a whole job's state (any number of trials), so trial_checkpoints becomes
job_checkpoints, found by the job's first trial id. Checkpoints of trials running during the upgrade
are dropped: such a trial, if its worker dies, starts over instead of resuming.

Revision ID: 0004_13b
Revises: 0003
Create Date: 2026-12-01 22:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_13b'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt_token', sa.String(length=32), nullable=True,
                                      comment="the running attempt's token: every write of that attempt is guarded by it"))
    op.drop_table('trial_checkpoints')
    op.create_table('job_checkpoints',
    sa.Column('first_trial_id', sa.Integer(), nullable=False),
    sa.Column('trial_ids', sa.JSON(), nullable=False, comment="the job's trials, in the engine's order"),
    sa.Column('attempt_token', sa.String(length=32), nullable=False, comment='the attempt that owns it'),
    sa.Column('epoch', sa.Integer(), nullable=False, comment='last epoch whose metrics it includes'),
    sa.Column('data', sa.LargeBinary(), nullable=True),
    sa.Column('location', sa.String(length=1000), nullable=True, comment='where the bytes are, when not in data'),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['first_trial_id'], ['trials.id'], name=op.f('fk_job_checkpoints_first_trial_id_trials'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('first_trial_id', name=op.f('pk_job_checkpoints'))
    )


def downgrade() -> None:
    op.drop_table('job_checkpoints')
    op.create_table('trial_checkpoints',
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False, comment='the attempt that wrote it'),
    sa.Column('epoch', sa.Integer(), nullable=False, comment='last epoch whose metrics it includes'),
    sa.Column('data', sa.LargeBinary(), nullable=True),
    sa.Column('location', sa.String(length=1000), nullable=True, comment='where the bytes are, when not in data'),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.id'], name=op.f('fk_trial_checkpoints_trial_id_trials'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('trial_id', name=op.f('pk_trial_checkpoints'))
    )
    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.drop_column('attempt_token')
