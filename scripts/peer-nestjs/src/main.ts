// GET /v1/analytics/performance/:vehicleId as a NestJS + TypeORM service would write it: the
// sums over the raw history, one query per stream, through TypeORM's pool of `pg`
// connections. The same tables and the same answer as the daemon's route (its window, DC,
// AC over the vehicle's sessions, ratio, average battery temperature, meters).
import "reflect-metadata";
import { Controller, Get, Injectable, Module, NotFoundException, Param, Query } from "@nestjs/common";
import { NestFactory } from "@nestjs/core";
import { InjectDataSource, TypeOrmModule } from "@nestjs/typeorm";
import { DataSource } from "typeorm";

const THRESHOLD = 0.85;
const round = (value: number, decimals: number) => Number(value.toFixed(decimals));

@Injectable()
class AnalyticsService {
  constructor(@InjectDataSource() private readonly db: DataSource) {}

  async performance(vehicleId: string, startTime?: string, endTime?: string) {
    const end = endTime ? new Date(endTime) : new Date();
    const start = startTime ? new Date(startTime) : new Date(end.getTime() - 24 * 3600 * 1000);
    const [dc] = await this.db.query(
      `SELECT coalesce(sum(kwh_delivered_dc), 0) AS kwh, count(*)::int AS n,
              avg(battery_temp) AS temp
       FROM vehicle_readings WHERE vehicle_id = $1 AND ts >= $2 AND ts < $3`,
      [vehicleId, start, end],
    );
    const meters: { meter_id: string; n: number; kwh: number }[] = await this.db.query(
      `SELECT s.meter_id, count(m.ts)::int AS n, coalesce(sum(m.kwh_consumed_ac), 0) AS kwh
       FROM charging_sessions s
       LEFT JOIN meter_readings m ON m.meter_id = s.meter_id
        AND m.ts >= greatest(s.started_at, $2) AND m.ts < least(coalesce(s.ended_at, 'infinity'), $3)
       WHERE s.vehicle_id = $1 AND s.started_at < $3 AND (s.ended_at IS NULL OR s.ended_at > $2)
       GROUP BY s.meter_id ORDER BY s.meter_id`,
      [vehicleId, start, end],
    );
    if (dc.n === 0 && meters.length === 0) {
      throw new NotFoundException(`no vehicle '${vehicleId}' has reported or been linked`);
    }
    const ac = meters.reduce((total, m) => total + Number(m.kwh), 0);
    const ratio = ac > 0 ? round(Number(dc.kwh) / ac, 4) : null;
    return {
      vehicleId,
      window: { startTime: start.toISOString(), endTime: end.toISOString() },
      totalAcConsumedKwh: round(ac, 6),
      totalDcDeliveredKwh: round(Number(dc.kwh), 6),
      efficiencyRatio: ratio,
      avgBatteryTemp: dc.temp === null ? null : round(Number(dc.temp), 3),
      readings: { meter: meters.reduce((t, m) => t + m.n, 0), vehicle: dc.n },
      meters: meters.map((m) => ({ meterId: m.meter_id, acConsumedKwh: round(Number(m.kwh), 6), readings: m.n })),
      alert: ratio !== null && ratio < THRESHOLD,
      alertThreshold: THRESHOLD,
    };
  }
}

@Controller("v1/analytics")
class AnalyticsController {
  constructor(private readonly analytics: AnalyticsService) {}

  @Get("performance/:vehicleId")
  performance(
    @Param("vehicleId") vehicleId: string,
    @Query("startTime") startTime?: string,
    @Query("endTime") endTime?: string,
  ) {
    return this.analytics.performance(vehicleId, startTime, endTime);
  }
}

@Module({
  imports: [
    TypeOrmModule.forRoot({
      type: "postgres",
      url: process.env.DATABASE_URL,
      synchronize: false,
      extra: { max: Number(process.env.DB_POOL_SIZE ?? 10) },
    }),
  ],
  controllers: [AnalyticsController],
  providers: [AnalyticsService],
})
class AppModule {}

async function main() {
  const app = await NestFactory.create(AppModule, { logger: ["error", "warn"] });
  await app.listen(Number(process.env.PORT ?? 3000), "127.0.0.1");
}
main();
